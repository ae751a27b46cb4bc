"""The self-contained HTML report: sections registered by name, assembled in order by `kneeoa.report.html`."""
