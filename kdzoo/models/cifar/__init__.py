"""CIFAR model zoo (state_dict-compatible with RepDistiller / mdistiller / SimKD / OFD checkpoints)."""

from kdzoo.models.cifar import (  # noqa: F401
    mobilenetv2,
    mv2_tinyimagenet,
    pyramidnet,
    resnet,
    resnet_simkd,
    resnetv2,
    shufflenetv1,
    shufflenetv2,
    vgg,
    wrn,
)
