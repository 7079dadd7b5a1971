"""Models of `svdkern train`: an MLP and a small CNN for 8×8 digits, CIFAR ResNets, and
a small GPT-2 for byte-level language modelling.

Every model names its final classifier `fc`; the pipeline decomposes every other
Linear/Conv2d (the authors decompose every conv — first, stride-2 and 1×1
shortcut convs — but not the final Linear) and, in GPT-2, every transformers `Conv1D`
(c_attn, c_proj, c_fc); its embeddings are not decomposable layers, and its `fc` (the LM
head) shares its weight with the token embedding, which `svdkern.decompose` leaves dense
anyway.

ResNet-20/32/56/110 are He et al.'s CIFAR networks (3 stages of 16/32/64 channels,
n = (depth − 2)/6 BasicBlocks each, option-A shortcuts: stride-2 subsampling and
zero channel padding, no parameters). ResNet-18 is the usual CIFAR variant
(3×3 stem, stages of 64/128/256/512 channels, 1×1-conv shortcuts).

gpt2-tiny is transformers' GPT2Model from a GPT2Config (random weights, nothing
downloaded; default 4 layers, width 192, 4 heads, no dropout, n_positions = the window
length) and a bias-free `fc` head tied to the token embedding, as GPT2LMHeadModel ties it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["CLASSIFIER", "LM_MODELS", "MODELS", "SIZES", "build_model", "model_sizes"]

CLASSIFIER = "fc"
MODELS = ("mlp", "cnn", "resnet20", "resnet32", "resnet56", "resnet110", "resnet18", "gpt2-tiny")


class MLP(nn.Module):
    """Flatten → Linear(in, h) → ReLU → Linear(h, h) → ReLU → fc Linear(h, classes)."""

    def __init__(self, in_shape: tuple[int, ...], num_classes: int, hidden: int = 256) -> None:
        super().__init__()
        features = 1
        for d in in_shape:
            features *= d
        self.fc1 = nn.Linear(features, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.fc = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.fc1(x.flatten(1)))
        return self.fc(F.relu(self.fc2(x)))


def _conv_bn(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()
    )


class SmallCNN(nn.Module):
    """Four 3×3 conv-BN-ReLU (w, 2w | pool | 4w, 4w | pool) → global average → fc.

    With the default w = 16 on 8×8 digits (8×8 → 4×4 → 2×2): 61 k parameters, 1.19 M MACs.
    """

    def __init__(self, in_shape: tuple[int, ...], num_classes: int, width: int = 16) -> None:
        super().__init__()
        w = width
        self.features = nn.Sequential(
            _conv_bn(in_shape[0], w),
            _conv_bn(w, 2 * w),
            nn.MaxPool2d(2),
            _conv_bn(2 * w, 4 * w),
            _conv_bn(4 * w, 4 * w),
            nn.MaxPool2d(2),
        )
        self.fc = nn.Linear(4 * w, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x).mean(dim=(2, 3)))


class _PadShortcut(nn.Module):
    """Option-A shortcut: subsample by 2 and zero-pad the channels to `planes`."""

    def __init__(self, planes: int) -> None:
        super().__init__()
        self.planes = planes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, ::2, ::2]
        extra = self.planes - x.shape[1]
        return F.pad(x, (0, 0, 0, 0, extra // 2, extra - extra // 2))


class BasicBlock(nn.Module):
    """conv3×3-BN-ReLU-conv3×3-BN + shortcut, ReLU."""

    def __init__(self, c_in: int, planes: int, stride: int = 1, option: str = "A") -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != planes:
            if option == "A":
                self.shortcut = _PadShortcut(planes)
            else:
                self.shortcut = nn.Sequential(
                    nn.Conv2d(c_in, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes)
                )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """CIFAR ResNet: 3×3 stem, stages of BasicBlocks, global average pool, fc."""

    def __init__(
        self,
        blocks: list[int],
        widths: list[int],
        in_channels: int,
        num_classes: int,
        option: str,
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        layers = []
        c_in = widths[0]
        for i, (n, planes) in enumerate(zip(blocks, widths, strict=True)):
            stage = []
            for j in range(n):
                stride = 2 if i > 0 and j == 0 else 1
                stage.append(BasicBlock(c_in, planes, stride, option))
                c_in = planes
            layers.append(nn.Sequential(*stage))
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(c_in, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d | nn.Linear):
                nn.init.kaiming_normal_(m.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        return self.fc(self.layers(x).mean(dim=(2, 3)))


class GPT2LM(nn.Module):
    """GPT-2 language model: token ids (B, T) int64 → next-token logits (B, T, vocab).

    `transformer` is transformers' GPT2Model (token and position embeddings, `layers`
    pre-LN blocks of causal self-attention and a 4·width MLP with GPT-2's tanh GELU, final
    LayerNorm); `fc` is the LM head, its weight the token embedding's (tied).

    Example::

        model = GPT2LM(seq_len=64, vocab_size=256)
        logits = model(torch.randint(0, 256, (8, 64)))      # (8, 64, 256)
    """

    def __init__(
        self,
        seq_len: int,
        vocab_size: int = 256,
        width: int = 192,
        layers: int = 4,
        heads: int = 4,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        from transformers import GPT2Config, GPT2Model

        if width % heads:
            raise ValueError(f"width {width} must be a multiple of heads {heads}")
        config = GPT2Config(
            vocab_size=vocab_size,
            n_positions=seq_len,
            n_embd=width,
            n_layer=layers,
            n_head=heads,
            resid_pdrop=dropout,
            embd_pdrop=dropout,
            attn_pdrop=dropout,
            # GPT-2's tanh-approximated GELU as torch's one fused op, not transformers'
            # default "gelu_new" written as five elementwise ops (about a tenth of the dense
            # training step on CPU at the default sizes, the same for every method).
            activation_function="gelu_pytorch_tanh",
            bos_token_id=None,
            eos_token_id=None,
            use_cache=False,
        )
        self.transformer = GPT2Model(config)
        self.fc = nn.Linear(width, vocab_size, bias=False)
        self.fc.weight = self.transformer.wte.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.transformer(input_ids=x, use_cache=False).last_hidden_state)


# The sizes each model takes (build_model's keyword arguments); those with a flag of
# `svdkern train` (--width, --layers, --heads) come from the run's configuration.
SIZES = {
    "mlp": ("hidden",),
    "cnn": ("width",),
    "gpt2-tiny": ("width", "layers", "heads", "dropout"),
}
SIZE_FLAGS = ("width", "layers", "heads")
# Models of the "lm" task: token windows (B, T) in, logits (B, T, vocab) out.
LM_MODELS = ("gpt2-tiny",)


def model_sizes(cfg: dict) -> dict[str, int]:
    """The size flags a run's configuration sets ({"width": 64, ...}; unset ones left to
    the model's defaults)."""
    return {key: cfg[key] for key in SIZE_FLAGS if cfg.get(key) is not None}


def build_model(name: str, in_shape: tuple[int, ...], num_classes: int, **sizes) -> nn.Module:
    """A fresh model by name: mlp, cnn, resnet20/32/56/110, resnet18, gpt2-tiny.

    `sizes` override a model's defaults: mlp `hidden`; cnn `width`; gpt2-tiny `width`,
    `layers`, `heads`, `dropout` (its in_shape is (seq_len,), num_classes its vocabulary).
    """
    unknown = sorted(set(sizes) - set(SIZES.get(name, ())))
    if unknown and name in MODELS:
        raise ValueError(
            f"model {name!r} takes the sizes {list(SIZES.get(name, ())) or 'none'}; got {unknown}"
        )
    if name == "mlp":
        return MLP(in_shape, num_classes, **sizes)
    if name == "cnn":
        return SmallCNN(in_shape, num_classes, **sizes)
    if name in ("resnet20", "resnet32", "resnet56", "resnet110"):
        n = (int(name[6:]) - 2) // 6
        return ResNet([n, n, n], [16, 32, 64], in_shape[0], num_classes, option="A")
    if name == "resnet18":
        return ResNet([2, 2, 2, 2], [64, 128, 256, 512], in_shape[0], num_classes, option="B")
    if name == "gpt2-tiny":
        if len(in_shape) != 1:
            raise ValueError(
                f"gpt2-tiny takes windows of token ids, in_shape (seq_len,); got {in_shape}"
            )
        return GPT2LM(in_shape[0], num_classes, **sizes)
    raise ValueError(f"unknown model {name!r}; expected one of {', '.join(MODELS)}")
