"""MATPAC for Hugging Face transformers: importing the package registers its classes with the Auto classes."""

from transformers import (
    AutoConfig,
    AutoFeatureExtractor,
    AutoModel,
    AutoModelForAudioClassification,
    AutoModelForPreTraining,
)

from .configuration_matpac import MatpacConfig
from .feature_extraction_matpac import MatpacFeatureExtractor
from .modeling_matpac import (
    MatpacForAudioClassification,
    MatpacForPreTraining,
    MatpacModel,
    MatpacPreTrainedModel,
)


AutoConfig.register(MatpacConfig.model_type, MatpacConfig)
AutoModel.register(MatpacConfig, MatpacModel)
AutoModelForPreTraining.register(MatpacConfig, MatpacForPreTraining)
AutoModelForAudioClassification.register(MatpacConfig, MatpacForAudioClassification)
AutoFeatureExtractor.register(MatpacConfig, MatpacFeatureExtractor)

MatpacConfig.register_for_auto_class()
MatpacModel.register_for_auto_class("AutoModel")
MatpacForPreTraining.register_for_auto_class("AutoModelForPreTraining")
MatpacForAudioClassification.register_for_auto_class("AutoModelForAudioClassification")
MatpacFeatureExtractor.register_for_auto_class()

__all__ = [
    "MatpacConfig",
    "MatpacFeatureExtractor",
    "MatpacForAudioClassification",
    "MatpacForPreTraining",
    "MatpacModel",
    "MatpacPreTrainedModel",
]
