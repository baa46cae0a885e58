"""torchvision's MobileNetV2 and V3 rebuilt in plain PyTorch: the reference ``npmobile verify`` runs a
PyTorch state dict in, and the parity tests' models (tests/test_torch.py). Only verify and the tests
import this module (it imports torch); the engine never does.

The torchvision wheel on the package index is built against another torch than the CPU wheel and
fails at import ("operator torchvision::nms does not exist"), so the two architectures are built
here, written from torchvision's documented structure: the same module attribute names (so state dict
keys are torchvision's: ``features.1.block.0.0.weight``, ``features.2.conv.1.0.weight``,
``features.4.block.2.fc1.weight``, ``classifier.3.weight``), the same widths, paddings, epsilons and
activations. ``randomize`` gives a model weights and BatchNorm statistics far from the identity, so a
wrong epsilon, layout or padding shows in the outputs.
"""

from __future__ import annotations

import torch
from torch import nn

from npmobile.applications.common import make_divisible


class ConvNormAct(nn.Sequential):
    """torchvision.ops.Conv2dNormActivation: [0] conv, [1] BatchNorm, [2] activation (if any)."""

    def __init__(self, cin: int, cout: int, kernel: int = 3, stride: int = 1, groups: int = 1, eps: float = 1e-5,
                 activation: type[nn.Module] | None = nn.ReLU6, dilation: int = 1):
        layers = [nn.Conv2d(cin, cout, kernel, stride, (kernel - 1) // 2 * dilation, dilation=dilation, groups=groups,
                            bias=False),
                  nn.BatchNorm2d(cout, eps=eps)]
        if activation is not None:
            layers.append(activation())
        super().__init__(*layers)


class SqueezeExcitation(nn.Module):
    def __init__(self, channels: int, squeeze: int):
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, squeeze, 1)
        self.fc2 = nn.Conv2d(squeeze, channels, 1)
        self.activation = nn.ReLU()
        self.scale_activation = nn.Hardsigmoid()

    def forward(self, x):
        scale = self.scale_activation(self.fc2(self.activation(self.fc1(self.avgpool(x)))))
        return scale * x


class InvertedResidualV2(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expansion: int):
        super().__init__()
        hidden = int(round(cin * expansion))
        self.use_res_connect = stride == 1 and cin == cout
        layers: list[nn.Module] = []
        if expansion != 1:
            layers.append(ConvNormAct(cin, hidden, 1))
        layers += [ConvNormAct(hidden, hidden, 3, stride, groups=hidden), nn.Conv2d(hidden, cout, 1, bias=False),
                   nn.BatchNorm2d(cout)]
        self.conv = nn.Sequential(*layers)

    def forward(self, x):
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


class MobileNetV2(nn.Module):
    SETTING = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
               (6, 320, 1, 1)]

    def __init__(self, num_classes: int = 1000, width_mult: float = 1.0):
        super().__init__()
        cin = make_divisible(32 * width_mult)
        last = make_divisible(1280 * max(1.0, width_mult))
        features: list[nn.Module] = [ConvNormAct(3, cin, 3, 2)]
        for t, c, n, s in self.SETTING:
            cout = make_divisible(c * width_mult)
            for i in range(n):
                features.append(InvertedResidualV2(cin, cout, s if i == 0 else 1, t))
                cin = cout
        features.append(ConvNormAct(cin, last, 1))
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(last, num_classes))

    def forward(self, x):
        x = nn.functional.adaptive_avg_pool2d(self.features(x), (1, 1))
        return self.classifier(torch.flatten(x, 1))


class InvertedResidualV3(nn.Module):
    def __init__(self, cin: int, kernel: int, expanded: int, cout: int, se: bool, hardswish: bool, stride: int,
                 dilation: int = 1):
        super().__init__()
        act = nn.Hardswish if hardswish else nn.ReLU
        self.use_res_connect = stride == 1 and cin == cout
        layers: list[nn.Module] = []
        if expanded != cin:
            layers.append(ConvNormAct(cin, expanded, 1, eps=1e-3, activation=act))
        # dilated: the depthwise layer keeps its input's resolution (stride 1); the residual still goes by ``stride``
        layers.append(ConvNormAct(expanded, expanded, kernel, 1 if dilation > 1 else stride, groups=expanded, eps=1e-3,
                                  activation=act, dilation=dilation))
        if se:
            layers.append(SqueezeExcitation(expanded, make_divisible(expanded // 4)))
        layers.append(ConvNormAct(expanded, cout, 1, eps=1e-3, activation=None))
        self.block = nn.Sequential(*layers)

    def forward(self, x):
        y = self.block(x)
        return y + x if self.use_res_connect else y


def v3_setting(arch: str, reduced_tail: bool):
    """(in, kernel, expanded, out, se, hardswish, stride) per block, and the classifier's width.

    Written out again from torchvision, not taken from npmobile.applications.torchvision: a reference that
    shared npmobile's table would agree with a mistake in it."""
    d = 2 if reduced_tail else 1
    if arch == "mobilenet_v3_large":
        return [(16, 3, 16, 16, False, False, 1), (16, 3, 64, 24, False, False, 2), (24, 3, 72, 24, False, False, 1),
                (24, 5, 72, 40, True, False, 2), (40, 5, 120, 40, True, False, 1), (40, 5, 120, 40, True, False, 1),
                (40, 3, 240, 80, False, True, 2), (80, 3, 200, 80, False, True, 1), (80, 3, 184, 80, False, True, 1),
                (80, 3, 184, 80, False, True, 1), (80, 3, 480, 112, True, True, 1), (112, 3, 672, 112, True, True, 1),
                (112, 5, 672, 160 // d, True, True, 2), (160 // d, 5, 960 // d, 160 // d, True, True, 1),
                (160 // d, 5, 960 // d, 160 // d, True, True, 1)], 1280 // d
    return [(16, 3, 16, 16, True, False, 2), (16, 3, 72, 24, False, False, 2), (24, 3, 88, 24, False, False, 1),
            (24, 5, 96, 40, True, True, 2), (40, 5, 240, 40, True, True, 1), (40, 5, 240, 40, True, True, 1),
            (40, 5, 120, 48, True, True, 1), (48, 5, 144, 48, True, True, 1), (48, 5, 288, 96 // d, True, True, 2),
            (96 // d, 5, 576 // d, 96 // d, True, True, 1), (96 // d, 5, 576 // d, 96 // d, True, True, 1)], 1024 // d


class MobileNetV3(nn.Module):
    def __init__(self, arch: str, num_classes: int = 1000, width_mult: float = 1.0, reduced_tail: bool = False,
                 dilated: bool = False):
        super().__init__()
        setting, last_channel = v3_setting(arch, reduced_tail)
        width = lambda c: make_divisible(c * width_mult)  # noqa: E731
        features: list[nn.Module] = [ConvNormAct(3, width(16), 3, 2, eps=1e-3, activation=nn.Hardswish)]
        for n, (cin, kernel, expanded, cout, se, hs, stride) in enumerate(setting):
            dilation = 2 if dilated and n >= len(setting) - 3 else 1  # torchvision's dilated=True: the last stage
            features.append(InvertedResidualV3(width(cin), kernel, width(expanded), width(cout), se, hs, stride,
                                               dilation))
        last_in = width(setting[-1][3])
        features.append(ConvNormAct(last_in, 6 * last_in, 1, eps=1e-3, activation=nn.Hardswish))
        self.features = nn.Sequential(*features)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Linear(6 * last_in, width(last_channel)), nn.Hardswish(), nn.Dropout(0.2),
                                        nn.Linear(width(last_channel), num_classes))

    def forward(self, x):
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


def build(arch: str, **kwargs) -> nn.Module:
    if arch == "mobilenet_v2":
        return MobileNetV2(**kwargs)
    return MobileNetV3(arch, **kwargs)


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Weights and BatchNorm statistics far from the identity (a wrong epsilon or layout shows), eval mode."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                c = module.num_features
                module.weight.copy_(torch.rand(c, generator=g) * 0.5 + 0.5)
                module.bias.copy_(torch.randn(c, generator=g) * 0.2)
                module.running_mean.copy_(torch.randn(c, generator=g) * 0.2)
                # Variances down to 0.05, where BatchNorm's epsilon (1e-5 or 1e-3) shows in the outputs.
                module.running_var.copy_(torch.rand(c, generator=g) + 0.05)
                module.num_batches_tracked.fill_(1234)
            elif isinstance(module, (nn.Conv2d, nn.Linear)):
                fan_in = module.weight[0].numel()
                module.weight.copy_(torch.randn(module.weight.shape, generator=g) * (1.0 / fan_in) ** 0.5)
                if module.bias is not None:
                    module.bias.copy_(torch.randn(module.bias.shape, generator=g) * 0.1)
    return model.eval()
