"""ncsn_tf: NCSNv2 score-based generative models in TensorFlow/Keras 3."""
__version__ = "0.1.0"
