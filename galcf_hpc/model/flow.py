"""Invertible flow F: z1 -> h built from FrEIA coupling blocks (Glow-style affine couplings
with a fixed random permutation and a learned global affine per block)."""

import FrEIA.framework as Ff
import FrEIA.modules as Fm
import numpy as np
import torch
from torch import nn


def _subnet(hidden):
    def make(c_in, c_out):
        net = nn.Sequential(
            nn.Linear(c_in, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, c_out)
        )
        # zero-initialised last layer: every block starts as the identity (stable start)
        nn.init.zeros_(net[-1].weight)
        nn.init.zeros_(net[-1].bias)
        return net

    return make


def build_flow(dim, blocks, hidden, clamp, seed=0):
    """A FrEIA SequenceINN on vectors of size ``dim``: ``h, logdet = flow(z1)``;
    ``z1, _ = flow(h, rev=True)``. The permutations are drawn from ``seed`` and stored in
    the state dict, so a checkpoint restores exactly the same flow."""
    state = np.random.get_state()
    np.random.seed(seed)  # FrEIA draws its permutations from numpy's global generator
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            inn = Ff.SequenceINN(dim)
            for _ in range(blocks):
                inn.append(
                    Fm.AllInOneBlock, subnet_constructor=_subnet(hidden), affine_clamping=clamp, permute_soft=False
                )
    finally:
        np.random.set_state(state)
    return inn


def flow_forward(flow, z1):
    h, logdet = flow(z1)
    return h, logdet.reshape(-1)


def flow_inverse(flow, h):
    z1, _ = flow(h, rev=True)
    return z1
