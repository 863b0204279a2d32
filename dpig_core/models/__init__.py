"""The DPIG networks, one module each."""

from dpig_core.models.decoder import UNetDecoder
from dpig_core.models.discriminator import DCGANDiscriminator
from dpig_core.models.dpig import DPIG, factor_dims
from dpig_core.models.encoder import AppEncoder, FgBgEncoder, build_encoder
from dpig_core.models.mlp import Critic, Mapping, ResidualMLP
from dpig_core.models.pose_ae import PoseAE, PoseDecoder

__all__ = [
    "DPIG", "AppEncoder", "Critic", "DCGANDiscriminator", "FgBgEncoder", "Mapping", "PoseAE",
    "PoseDecoder", "ResidualMLP", "UNetDecoder", "build_encoder", "factor_dims",
]  # fmt: skip
