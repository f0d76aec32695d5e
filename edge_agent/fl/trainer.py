"""Local training for one round: Opacus DP-SGD (or plain SGD), FedProx, update clipping.

Imported by the ClientApp's handlers only (it imports torch and Opacus).
"""

from __future__ import annotations

import time
import warnings
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

# build_trainable_model moved to the shared layer (the server builds its global model with
# it too); it stays importable here.
from edgefl.zoo import build_trainable_model

__all__ = ["LocalResult", "build_trainable_model", "evaluate_local", "train_local"]


@dataclass
class LocalResult:
    """What one round of local training produced.

    Attributes:
        state: The new local weights (name -> numpy array, the global model's keys).
        loss: Mean training loss over the round's batches.
        history: The accountant history after training (empty without DP).
        steps: Optimizer steps taken.
        train_time_s: Wall time of the training itself.
    """

    state: OrderedDict[str, npt.NDArray[np.float32]]
    loss: float
    history: list[list[float]]
    steps: int
    train_time_s: float


def _load(model: nn.Module, state: dict[str, npt.NDArray[np.float32]]) -> None:
    model.load_state_dict(
        OrderedDict((k, torch.from_numpy(np.array(v, copy=True))) for k, v in state.items()),
        strict=True,
    )


def train_local(
    model_name: str,
    global_state: dict[str, npt.NDArray[np.float32]],
    x: npt.NDArray[np.float32],
    y: npt.NDArray[np.int64],
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    momentum: float,
    optimizer: str,
    seed: int,
    dp: bool,
    sigma: float,
    max_grad_norm: float,
    history: list[list[float]],
    proximal_mu: float = 0.0,
    clipping_norm: float = 0.0,
    batches_per_epoch: int = 0,
    augment_views: int = 1,
    augment_shift: int = 1,
    clip_per_layer: bool = False,
    centre_inputs: bool = False,
) -> LocalResult:
    """Train a fresh copy of the global model on (x, y) for one round.

    With ``dp``, a fresh ``PrivacyEngine`` whose RDP accountant starts from ``history``
    wraps a fresh module (Poisson sampling, per-sample clip ``max_grad_norm``, noise σ).
    Each epoch takes exactly ``batches_per_epoch`` steps, each sampling every sample of
    (x, y) with probability ``1 / batches_per_epoch`` (the run's privacy plan, fixed
    whatever the data size now; 0: ``ceil(len(x) / batch_size)``), so the accountant
    records ``(σ, 1 / batches_per_epoch, batches_per_epoch × epochs)``.
    Empty Poisson batches still take a (noise-only) step, as the accounting assumes.

    Args:
        model_name: Zoo model.
        global_state: The global weights.
        x: Inputs.
        y: Labels.
        epochs: Local epochs.
        batch_size: Expected batch size.
        lr: Learning rate.
        momentum: SGD momentum.
        optimizer: ``sgd`` or ``adam``.
        seed: Seed of sampling, noise and shuffling for this round.
        dp: Use DP-SGD.
        sigma: Noise multiplier.
        max_grad_norm: Per-sample clip.
        history: Accountant history before this round.
        proximal_mu: FedProx μ; adds ``μ/2 ||w - w_global||²`` to the loss when > 0.
        clipping_norm: Central-DP clip of the whole update ``w - w_global`` when > 0.
        batches_per_epoch: DP-SGD steps per epoch of the privacy plan (0: from the data).
        augment_views: Augmentation multiplicity K: each sampled image is seen as K
            copies, each shifted by up to ``augment_shift`` pixels, and its gradient is the
            mean over its K views, taken *before* the per-sample clip (1: no
            augmentation). See :func:`_shifted_views`.
        augment_shift: Largest shift of a view, in pixels, along each image axis.
        clip_per_layer: Clip each parameter tensor's per-sample gradient to
            ``max_grad_norm / sqrt(#tensors)`` instead of the whole gradient to
            ``max_grad_norm`` (Opacus' ``per_layer`` clipping). Each sample's whole
            gradient then still has norm <= ``max_grad_norm``, and the noise is
            ``σ × max_grad_norm``, so the accounting is the same.
        centre_inputs: Train on each sample minus its own mean pixel value, and keep the
            first Linear layer's weight rows summing to zero, so the returned model
            computes the same on raw inputs (see :func:`_centre_rows`).

    Returns:
        The new weights, mean loss, accountant history, steps and training time.
    """
    from torch.utils.data import DataLoader, TensorDataset

    torch.manual_seed(seed)
    model = build_trainable_model(model_name)
    _load(model, global_state)
    global_params = [p.detach().clone() for p in model.parameters()]
    generator = torch.Generator().manual_seed(seed)
    first_linear = _first_linear(model) if centre_inputs else None
    if first_linear is not None:
        x = _centred(x)
        _centre_rows(first_linear)
    dataset = TensorDataset(torch.from_numpy(x), torch.from_numpy(y))
    loader: DataLoader[tuple[torch.Tensor, ...]]
    if dp:
        batches = batches_per_epoch or max(1, -(-len(x) // batch_size))
        loader = _poisson_loader(dataset, batches, generator)
    else:
        loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, generator=generator)
    params = model.parameters()
    opt: torch.optim.Optimizer = (
        torch.optim.Adam(params, lr=lr)
        if optimizer == "adam"
        else torch.optim.SGD(params, lr=lr, momentum=momentum)
    )
    engine = None
    train_module: nn.Module = model
    views = max(1, augment_views)
    view_generator = torch.Generator().manual_seed(seed + 2)
    if dp:
        from opacus import PrivacyEngine

        engine = PrivacyEngine(accountant="rdp")
        if history:
            engine.accountant.load_state_dict(
                {
                    "history": [(float(s), float(q), int(n)) for s, q, n in history],
                    "mechanism": "rdp",
                }
            )
        clips: float | list[float] = (
            _layer_norms(model, max_grad_norm) if clip_per_layer else max_grad_norm
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # The loader already samples as planned: Opacus' sample rate is
            # 1 / len(loader) = 1 / batches, exactly the plan's q.
            train_module, opt, loader = engine.make_private(
                module=model,
                optimizer=opt,
                data_loader=loader,
                noise_multiplier=sigma,
                max_grad_norm=clips,
                clipping="per_layer" if clip_per_layer else "flat",
                noise_generator=torch.Generator().manual_seed(seed + 1),
                poisson_sampling=False,
            )
        # What make_private does with its own Poisson sampling: one backward per step.
        train_module.forbid_grad_accumulation()  # type: ignore[operator]
    loss_fn = nn.CrossEntropyLoss()
    train_module.train()
    started = time.perf_counter()
    total, count, steps = 0.0, 0, 0
    for _ in range(epochs):
        for xb, yb in loader:
            opt.zero_grad()
            if views > 1:
                out = train_module(_shifted_views(xb, views, augment_shift, view_generator))
                targets = yb.repeat_interleave(views)
            else:
                out, targets = train_module(xb), yb
            if len(xb):
                loss = loss_fn(out, targets)
                total += float(loss.item()) * len(xb)
                count += len(xb)
            else:  # an empty Poisson batch: a noise-only step, as accounted
                loss = out.sum() * 0.0
            if proximal_mu > 0:
                prox = sum(
                    ((p - g) ** 2).sum()
                    for p, g in zip(train_module.parameters(), global_params, strict=True)
                )
                loss = loss + (proximal_mu / 2.0) * prox
            loss.backward()
            if dp and views > 1:
                _average_views(train_module, views)
            opt.step()
            if first_linear is not None:
                _centre_rows(first_linear)
            steps += 1
    train_time = time.perf_counter() - started
    # GradSampleModule keeps the original module as ``_module``; its keys are the model's.
    inner: nn.Module = getattr(train_module, "_module", train_module)
    state = OrderedDict(
        (k, v.detach().cpu().numpy().astype(np.float32, copy=True))
        for k, v in inner.state_dict().items()
    )
    if clipping_norm > 0:
        _clip_update(state, global_state, clipping_norm)
    new_history: list[list[float]] = []
    if engine is not None:
        new_history = [[float(s), float(q), int(n)] for s, q, n in engine.accountant.history]
    return LocalResult(
        state=state,
        loss=total / count if count else float("nan"),
        history=new_history,
        steps=steps,
        train_time_s=train_time,
    )


def _poisson_loader(
    dataset: torch.utils.data.TensorDataset, batches: int, generator: torch.Generator
) -> torch.utils.data.DataLoader[tuple[torch.Tensor, ...]]:
    """Poisson sampling at rate ``1 / batches`` over the whole dataset, ``batches`` steps.

    What Opacus' ``DPDataLoader`` does, except that the number of steps is the plan's
    (``DPDataLoader`` takes ``int(1 / q)``, one less than ``batches`` for some values)
    and the rate does not follow the dataset's size.

    Raises:
        EdgeflError: The data holds fewer samples than the plan has batches (Opacus'
            expected batch size would be 0).
    """
    from opacus.data_loader import wrap_collate_with_empty
    from opacus.utils.uniform_sampler import UniformWithReplacementSampler
    from torch.utils.data import DataLoader
    from torch.utils.data._utils.collate import default_collate

    if int(len(dataset) * (1.0 / batches)) < 1:  # how Opacus computes it
        from edgefl.errors import EdgeflError

        raise EdgeflError(
            f"the local data holds {len(dataset)} samples, fewer than the {batches} batches "
            "per epoch of this run's privacy plan",
            hint="the data store shrank during the run (training.max_samples lowered?); "
            "the device can train again in the next run",
        )
    first = dataset[0]
    return DataLoader(
        dataset,
        batch_sampler=UniformWithReplacementSampler(
            num_samples=len(dataset), sample_rate=1.0 / batches, generator=generator, steps=batches
        ),
        collate_fn=wrap_collate_with_empty(
            collate_fn=default_collate,
            sample_empty_shapes=[(0, *t.shape) for t in first],
            dtypes=[t.dtype for t in first],
        ),
        generator=generator,
    )


def _centred(x: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    """Each sample minus the mean of its own values (nothing shared between samples)."""
    axes = tuple(range(1, x.ndim))
    return np.ascontiguousarray(x - x.mean(axis=axes, keepdims=True), dtype=np.float32)


def _first_linear(model: nn.Module) -> nn.Linear:
    """The model's first layer with parameters, which must be a Linear one.

    Raises:
        EdgeflError: The first parameterised layer is not Linear (a convolution's zero
            padding does not commute with centring).
    """
    for module in model.modules():
        if isinstance(module, nn.Linear):
            return module
        if any(True for _ in module.parameters(recurse=False)):
            break
    from edgefl.errors import EdgeflError

    raise EdgeflError("centre_inputs needs a model whose first layer is a Linear one")


@torch.no_grad()
def _centre_rows(layer: nn.Linear) -> None:
    """Make every row of ``layer.weight`` sum to zero.

    Why this is the same model as one trained on centred inputs: with rows summing to
    zero, ``W x = W (x - mean(x))`` for any input, so the server (which evaluates on raw
    inputs) and the device agree. The centred model never sees the weight's component
    along the all-ones direction (centred inputs are orthogonal to it), so removing it
    after each step changes none of that model's outputs; the per-sample gradients the
    optimizer clips are those of the centred inputs, which already lie in that subspace.
    Removing part of the (noisy) weights after the DP step is post-processing: the
    accounting is unchanged.
    """
    layer.weight -= layer.weight.mean(dim=1, keepdim=True)


def _shifted_views(
    xb: torch.Tensor, views: int, shift: int, generator: torch.Generator
) -> torch.Tensor:
    """``views`` randomly shifted copies of each image of ``xb`` (N, C, H, W), in order.

    Rows ``i*views ... i*views + views - 1`` of the result are the views of sample ``i``;
    each is the image moved by a uniform ``(dy, dx)`` in ``[-shift, shift]`` pixels, the
    uncovered border filled with zeros (the background of the bundled digit images).
    The first view of every sample is the image itself.
    """
    n = len(xb)
    repeated = xb.repeat_interleave(views, dim=0)
    if n == 0 or shift <= 0:
        return repeated
    height, width = xb.shape[-2], xb.shape[-1]
    padded = nn.functional.pad(repeated, (shift, shift, shift, shift))
    offsets = torch.randint(0, 2 * shift + 1, (n * views, 2), generator=generator)
    offsets[::views] = shift  # the unshifted view
    out = torch.empty_like(repeated)
    for dy in range(2 * shift + 1):
        for dx in range(2 * shift + 1):
            rows = (offsets[:, 0] == dy) & (offsets[:, 1] == dx)
            if bool(rows.any()):
                out[rows] = padded[rows, ..., dy : dy + height, dx : dx + width]
    return out


def _average_views(module: nn.Module, views: int) -> None:
    """Replace each per-sample gradient over ``N × views`` view rows by its mean per sample.

    Opacus has computed one gradient per row of the (viewed) batch; the optimizer step
    that follows clips, sums and noises ``p.grad_sample``, so after this it sees exactly
    one gradient per sampled sample: the per-sample sensitivity, the sample rate and the
    step count (the accounting) are those without augmentation.
    """
    for p in module.parameters():
        grad_sample = getattr(p, "grad_sample", None)
        if isinstance(grad_sample, torch.Tensor):
            averaged = grad_sample.reshape(-1, views, *grad_sample.shape[1:]).mean(dim=1)
            setattr(p, "grad_sample", averaged)  # noqa: B010 (an Opacus attribute)


def _layer_norms(model: nn.Module, max_grad_norm: float) -> list[float]:
    """Per-tensor clips whose root sum of squares is ``max_grad_norm`` (an equal split)."""
    tensors = [p for p in model.parameters() if p.requires_grad]
    return [max_grad_norm / float(np.sqrt(len(tensors)))] * len(tensors)


def _clip_update(
    state: OrderedDict[str, npt.NDArray[np.float32]],
    global_state: dict[str, npt.NDArray[np.float32]],
    clipping_norm: float,
) -> None:
    """Scale ``state - global_state`` to L2 norm <= clipping_norm (Flower's fixed clipping)."""
    deltas = {k: state[k] - np.asarray(global_state[k], dtype=np.float32) for k in state}
    norm = float(np.sqrt(sum(float((d.astype(np.float64) ** 2).sum()) for d in deltas.values())))
    scale = min(1.0, clipping_norm / norm) if norm > 0 else 1.0
    for k, d in deltas.items():
        state[k] = (np.asarray(global_state[k], dtype=np.float32) + d * scale).astype(np.float32)


@torch.inference_mode()
def evaluate_local(
    model_name: str,
    global_state: dict[str, npt.NDArray[np.float32]],
    x: npt.NDArray[np.float32],
    y: npt.NDArray[np.int64],
) -> tuple[float, float]:
    """Accuracy and mean loss of the global model on (x, y); (nan, nan) when empty."""
    if len(x) == 0:
        return float("nan"), float("nan")
    model = build_trainable_model(model_name)
    _load(model, global_state)
    model.eval()
    logits = model(torch.from_numpy(x))
    loss = float(nn.functional.cross_entropy(logits, torch.from_numpy(y)).item())
    acc = float((logits.argmax(1).numpy() == y).mean())
    return acc, loss
