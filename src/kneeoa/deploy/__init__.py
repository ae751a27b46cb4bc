"""Using a trained arm on new films: the model package (`export`), batch prediction (`predict`) and the web viewer
(`serve`). Inference is the run folder turned inside out: `predict` and `serve` load only the model folder that
`export` wrote, never a run folder.
"""
