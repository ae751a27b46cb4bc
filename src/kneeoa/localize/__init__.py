"""Finding knees on films and cutting crops: localisers, the film step, overviews, the model-free knee gate."""
