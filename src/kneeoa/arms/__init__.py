"""Every arm of a run loaded back as a function (crops in, probabilities out), for explanations and fusion."""
