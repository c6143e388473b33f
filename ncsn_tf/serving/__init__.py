"""Serving: the SavedModel's signatures (`signatures`), TF Serving's atomic versioned layout
(`versions`) and `export`, which writes one with its metadata (`saved_model`)."""
from ncsn_tf.serving.saved_model import METADATA_FILE, export, read_metadata
from ncsn_tf.serving.signatures import (DEFAULT_MAX_N_STEPS_EACH, SIGNATURES, ServingLimits,
                                        ServingModule)
from ncsn_tf.serving.versions import check_model_name, next_version, save_version

__all__ = ["DEFAULT_MAX_N_STEPS_EACH", "METADATA_FILE", "SIGNATURES", "ServingLimits",
           "ServingModule", "check_model_name", "export", "next_version", "read_metadata",
           "save_version"]
