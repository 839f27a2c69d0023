"""Ground truth: labelling the real answer (detector, optional judge) and scoring it against the prediction."""
