"""Small model families that timm/torchvision lack, registered by name for `quant.models`.

`cifar_resnet{20,32,44,56}`: He et al.'s CIFAR ResNets (option-A shortcuts);
`mobilenetv1_x0.25`: the ImageNet MobileNetV1 x0.25 with LeakyReLU(0.1) (Retinaface backbone).
Each entry carries its preprocessing (`data_config`) the way timm's `pretrained_cfg` does.
"""

from .cifar_resnet import CifarResNet, cifar_resnet
from .mobilenetv1 import MobileNetV1, mobilenetv1

CIFAR_MEAN_STD = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))  # as the checkpoints were trained
IMAGENET_MEAN_STD = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))

REGISTRY = {
    **{
        f"cifar_resnet{d}": (
            (lambda d=d: cifar_resnet(d)),
            {
                "input_size": (3, 32, 32),
                "mean": CIFAR_MEAN_STD[0],
                "std": CIFAR_MEAN_STD[1],
                "crop_pct": 1.0,
                "interpolation": "bilinear",
                "num_classes": 10,
            },
        )
        for d in (20, 32, 44, 56)
    },
    "mobilenetv1_x0.25": (
        lambda: mobilenetv1(0.25),
        {
            "input_size": (3, 224, 224),
            "mean": IMAGENET_MEAN_STD[0],
            "std": IMAGENET_MEAN_STD[1],
            "crop_pct": 224 / 256,
            "interpolation": "bilinear",
            "num_classes": 1000,
        },
    ),
}

__all__ = ["REGISTRY", "CifarResNet", "MobileNetV1", "cifar_resnet", "mobilenetv1"]
