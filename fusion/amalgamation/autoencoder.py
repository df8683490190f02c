"""Feature amalgamation (paper 004, Fig. 2 and 3): the teachers' features of one layer,
concatenated along the channels, compressed by a 1x1-convolution auto-encoder to the
student's width; all teachers at once (DFA) or two sets at a time (IFA)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from amalgam.fusion.device import Hardware, to_model
from amalgam.fusion.train import fit

SCHEMES = ("dfa", "ifa")


class FeatureAutoencoder(nn.Module):
    """``encode``: C_in -> C_out channels by a 1x1 convolution (Eq. 1; a linear map on (t, C)
    vectors); ``decode`` maps back. ``forward`` reconstructs its input (Eq. 4)."""

    def __init__(self, c_in: int, c_out: int, spatial: bool) -> None:
        super().__init__()
        layer = (lambda a, b: nn.Conv2d(a, b, 1)) if spatial else nn.Linear
        self.encoder, self.decoder = layer(c_in, c_out), layer(c_out, c_in)

    @torch.no_grad()
    def init_from_pca(self, features: Tensor) -> None:
        """Start at the optimum of Eq. 4 for a linear auto-encoder: the top-``C_out``
        principal subspace of the channels over every sample and position (Baldi & Hornik
        1989); training then only refines it."""
        rows = features.float().movedim(1, -1).reshape(-1, features.shape[1])  # (t*H*W, C_in)
        mean = rows.mean(dim=0)
        _, _, basis = torch.linalg.svd(rows - mean, full_matrices=False)
        width = self.encoder.weight.shape[0]
        basis = basis[:width]  # (C_out, C_in) principal directions, by decreasing variance
        basis = torch.cat([basis, basis.new_zeros(width - len(basis), basis.shape[1])])
        self.encoder.weight.copy_(basis.view_as(self.encoder.weight))
        self.encoder.bias.copy_(-(basis @ mean))
        self.decoder.weight.copy_(basis.T.reshape(self.decoder.weight.shape))
        self.decoder.bias.copy_(mean)

    def encode(self, features: Tensor) -> Tensor:
        """Stored (float16) features are computed on in the encoder's own type."""
        return self.encoder(features.to(self.encoder.weight.dtype))

    def forward(self, features: Tensor) -> Tensor:
        return self.decoder(self.encode(features))


def half_squared_error(prediction: Tensor, target: Tensor) -> Tensor:
    """``1/2 ||prediction - target||^2`` per sample, averaged over the batch: the
    reconstruction loss of Eq. 4 and the parameter-learning loss of Eq. 5."""
    dtype = torch.promote_types(prediction.dtype, torch.float32)  # half types sum in float32
    squared = (prediction.to(dtype) - target.to(dtype)).pow(2)
    return 0.5 * squared.flatten(1).sum(dim=1).mean()


def mean_energy(features: Tensor) -> float:
    """``1/2 ||F||^2`` per sample, averaged: the error of reconstructing ``F`` by zeros."""
    parts = features.split(256)
    zero = torch.zeros(())
    return sum(float(half_squared_error(zero, part)) * len(part) for part in parts) / len(features)


@dataclass(frozen=True)
class AutoencoderConfig:
    epochs: int = 5
    batch_size: int = 64
    lr: float = 1e-3
    seed: int = 0


@dataclass(frozen=True)
class Amalgamated:
    """``features``: (t, C_out, ...) float16, the student's target at this layer; ``losses``:
    the final reconstruction loss of each auto-encoder (one for DFA, N - 1 for IFA) relative
    to the energy of its input (0: exact, 1: no better than zeros)."""

    features: Tensor
    losses: list[float]


def _compress(
    features: Tensor,
    width: int,
    config: AutoencoderConfig,
    desc: str,
    progress: bool,
    hardware: Hardware,
) -> tuple[Tensor, float]:
    """(t, ``width``, ...) float16 codes of ``features`` on the host, and the relative
    reconstruction error of the auto-encoder trained on ``hardware``."""
    torch.manual_seed(config.seed)
    autoencoder = FeatureAutoencoder(features.shape[1], width, spatial=features.ndim == 4)
    autoencoder.init_from_pca(features)
    if config.epochs:
        fit(
            autoencoder,
            features,
            features,
            epochs=config.epochs,
            batch_size=config.batch_size,
            lr=config.lr,
            weight_decay=0.0,
            seed=config.seed,
            desc=desc,
            progress=progress,
            loss=half_squared_error,
            hardware=hardware,
        )
    with torch.no_grad():
        parts = [to_model(autoencoder, part) for part in features.split(256)]
        codes = [autoencoder.encode(part) for part in parts]
        error = sum(
            float(half_squared_error(autoencoder.decoder(code), part)) * len(part)
            for code, part in zip(codes, parts, strict=True)
        ) / len(features)
    return torch.cat(codes).to(torch.float16).cpu(), error / max(mean_energy(features), 1e-12)


def amalgamate_features(
    features: Sequence[Tensor],
    width: int,
    scheme: str = "dfa",
    config: AutoencoderConfig | None = None,
    *,
    desc: str = "amalgamate",
    progress: bool = True,
    hardware: Hardware = Hardware(),
) -> Amalgamated:
    """Compress the teachers' features of one layer, each (t, C_i, H, W) or (t, C_i), to
    (t, ``width``, ...).

    ``dfa`` trains one auto-encoder on the concatenation of all N feature sets; ``ifa``
    amalgamates the first two, then the result with the third, and so on (N - 1
    auto-encoders, each of output width ``width``). With two teachers both are the same.
    """
    config = config or AutoencoderConfig()
    if scheme not in SCHEMES:
        raise ValueError(f"scheme: unknown {scheme!r} (known: {', '.join(SCHEMES)})")
    if len({tuple(f.shape[2:]) for f in features}) > 1 or len({len(f) for f in features}) > 1:
        shapes = ", ".join(str(tuple(f.shape)) for f in features)
        raise ValueError(f"features: the teachers' shapes differ beyond the channels: {shapes}")
    if scheme == "dfa" or len(features) == 1:
        codes, loss = _compress(
            torch.cat(list(features), dim=1), width, config, desc, progress, hardware
        )
        return Amalgamated(codes, [loss])
    codes, losses = features[0], []
    for k, more in enumerate(features[1:], start=2):
        codes, loss = _compress(
            torch.cat([codes, more], dim=1), width, config, f"{desc} (IFA {k})", progress,
            hardware,
        )  # fmt: skip
        losses.append(loss)
    return Amalgamated(codes, losses)
