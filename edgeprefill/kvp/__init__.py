"""KV Prediction: aux models, layer maps, the predictor, ridge fit, gradient training, artifacts."""
