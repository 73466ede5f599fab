"""``eed``: Efficient Ensemble Defense (Jung & Song, CVPR 2025; docs/methods.md, EED).

From ONE input model (preferably adversarially trained, e.g. a ``train`` stage with
``adversarial:``), read top to bottom:

1. prepare: K copies of the model in an :class:`Ensemble` (K = ``len(cfg.scores)``).
2. masks: member k keeps the weights ranked highest by importance score ``cfg.scores[k]``
   (``edgec.importance``: magnitude, taylor, snip, fisher, ...), exactly ``target_sparsity`` pruned.
   With ``structure: channel`` member k instead loses whole channels (edgec.channels: Torch-Pruning's
   dependency groups ranked by score k, summed per channel) until its MACs are ``target_macs`` of the
   input's: every member is physically smaller, and the K scores choose different channels, so the
   members have different shapes (kept in ``RUN_DIR/stages/stageN.arch.json``, edgec.architecture).
3. fine-tune all members together with the shared engine on adversarial examples of the *ensemble*
   (PGD by default, pixel-space eps), with the loss of :func:`eed_loss`:
   ``mean_k CE_w(f_k(x_adv), y) + diversity * sim(x_adv) + l1 * sum |w|``, where ``CE_w`` weights
   samples the ensemble misclassifies by ``1 + misclassified_weight`` and ``sim`` is the mean
   pairwise cosine similarity of the members' non-true-class probabilities (pushing members to
   make different mistakes, ADP-style). With ``member_subset``, member k's CE covers only its own
   fixed share of the samples (:class:`MemberSubsets`).
4. calibrate: on a held-out share of the training data (excluded from fine-tuning), the smallest
   early-exit threshold whose dynamic accuracy reaches the full ensemble's (minus a tolerance);
   stored in the model (``threshold`` buffer) and in the run's metrics.

The stage's output model is the full ensemble (forward = log of the averaged probabilities, so it
exports as one ONNX graph). :func:`edgec.export.ensemble.export_dynamic` writes the deployable dynamic artifact: one ONNX
graph per member plus ``ensemble.json`` for :class:`edgec.runtime.ensemble.DynamicEnsemble`.
"""
from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from edgec.stages.config import Adversarial, Optim
from edgec.stages.registry import register_stage

import copy

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from edgec import importance as I
from edgec import masks as P
from edgec.attacks import Attack, InputSpace
from edgec.data import holdout_split
from edgec.stages.base import _subset, train_config


class EEDStage(Optim):
    """Efficient Ensemble Defense (docs/methods.md, EED): K sub-models of the input model pruned by K
    importance scores, adversarially fine-tuned together for robustness and diversity; at inference
    they run in order and stop early (threshold calibrated on held-out data)."""

    method: Literal["eed"]
    scores: list[Literal["magnitude", "taylor", "snip", "fisher", "fisher_w2", "random"]] = Field(
        ["magnitude", "snip", "fisher_w2"], min_length=2, description="one importance score per sub-model (K = len)")
    target_sparsity: float = Field(0.5, ge=0, lt=1, description="unstructured sparsity of each sub-model")
    structure: Literal["weight", "channel"] = Field(
        "weight", description="weight: unstructured masks at target_sparsity; channel: whole channels removed "
                              "(Torch-Pruning) to target_macs, so each member is smaller and faster")
    target_macs: float = Field(0.5, gt=0, lt=1, description="structure channel: each member's MACs as a ratio "
                                                            "of the input model's")
    round_to: int | None = Field(None, ge=1, description="structure channel: keep channel counts multiples of this")
    scope: Literal["global", "layer"] = "global"
    prune_first_last: bool = Field(False, description="also prune the first conv and the classifier")
    importance_batches: int = Field(4, ge=1, description="training batches for the data-aware scores")
    adversarial: Adversarial = Field(default_factory=lambda: Adversarial(step=2 / 255),
                                     description="attack against the ensemble for training (PGD-AT default)")
    diversity: float = Field(0.5, ge=0, description="weight of the pairwise similarity of the members' "
                                                     "non-true-class predictions on adversarial examples")
    misclassified_weight: float = Field(1.0, ge=0, description="extra CE weight of samples the ensemble gets wrong")
    l1: float = Field(1e-5, ge=0, description="weight of the L1 norm of the kept weights")
    member_subset: float | None = Field(
        None, gt=0, lt=1, description="each sub-model's cross-entropy sees only its own fixed, seeded share of the "
                                      "training samples (docs/methods.md, EED step 3); None: every member sees all")
    calibration_fraction: float = Field(0.1, gt=0, lt=1, description="share of train data held out to set the threshold")
    target_accuracy: float | None = Field(None, gt=0, le=1, description="held-out accuracy the dynamic ensemble must "
                                                                        "reach (default: full ensemble - tolerance)")
    accuracy_tolerance: float = Field(0.0, ge=0, lt=1)
    agree: int | None = Field(None, ge=2, description="also stop when the first `agree` sub-models agree")

    @model_validator(mode="after")
    def _structure_settings(self) -> "EEDStage":
        fields = type(self).model_fields
        if self.structure == "weight":
            odd = [k for k in ("target_macs", "round_to") if getattr(self, k) != fields[k].default]
            if odd:
                raise ValueError(f"{', '.join(odd)} apply to structure: channel; set it, or remove them")
        elif self.target_sparsity != fields["target_sparsity"].default:
            raise ValueError("structure: channel prunes whole channels to target_macs; remove target_sparsity "
                             "(it is the unstructured members' sparsity)")
        return self


class Ensemble(nn.Module):
    """K member networks; ``forward(x)`` = log of their averaged softmax (the full ensemble),
    ``forward(x, members=True)`` = the members' logits stacked (K, N, C)."""

    def __init__(self, members: list[nn.Module]):
        super().__init__()
        self.members = nn.ModuleList(members)
        self.register_buffer("threshold", torch.tensor(float("inf")))  # calibrated early-exit threshold

    def forward(self, x: Tensor, members: bool = False) -> Tensor:
        zs = torch.stack([m(x) for m in self.members])
        if members:
            return zs
        return torch.log(F.softmax(zs.float(), dim=-1).mean(0).clamp_min(1e-12))


def diversity_loss(member_logits: Tensor, y: Tensor) -> Tensor:
    """Mean pairwise cosine similarity of the members' probability vectors with the true class
    removed (K, N, C logits): 0 when members spread their wrong-class mass differently."""
    q = F.softmax(member_logits.float(), dim=-1) * (1 - F.one_hot(y, member_logits.shape[-1]).float())
    q = F.normalize(q, dim=-1)
    k = q.shape[0]
    sims = [(q[i] * q[j]).sum(-1).mean() for i in range(k) for j in range(i + 1, k)]
    return torch.stack(sims).mean()


class MemberSubsets(torch.utils.data.Dataset):
    """Training data where member k learns only from its own fixed share of the samples.

    Membership (a seeded Bernoulli(``fraction``) draw per sample and member, every sample in at least
    one member's share) travels with each sample through the shared engine as a soft target:
    ``[one_hot(y) (C), member bits (K)]``. The engine reads a soft target's argmax as the class, which is
    ``y`` (the first maximum; the bits are never larger than the one-hot 1). :func:`split_target`
    undoes it inside the EED loss.
    """

    def __init__(self, dataset, num_classes: int, k: int, fraction: float, seed: int):
        self.dataset, self.num_classes, self.k = dataset, num_classes, k
        rng = torch.Generator().manual_seed(int(seed) * 7919 + 0xEED)
        bits = torch.rand(len(dataset), k, generator=rng) < fraction
        orphan = ~bits.any(1)  # a sample no member would see goes to one member at random
        bits[orphan, torch.randint(0, k, (int(orphan.sum()),), generator=rng)] = True
        self.bits = bits.float()

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i):
        x, y = self.dataset[i][:2]
        onehot = F.one_hot(torch.as_tensor(int(y)), self.num_classes).float()
        return x, torch.cat([onehot, self.bits[i]])


def split_target(y: Tensor, num_classes: int) -> tuple[Tensor, Tensor | None]:
    """(class labels (N,), member weights (K, N) or None) from a plain or a :class:`MemberSubsets` target."""
    if y.ndim == 1:
        return y, None
    return y[:, :num_classes].argmax(-1), y[:, num_classes:].t()


def l1_of_kept(net: nn.Module) -> Tensor:
    """L1 of the masked layers' weights; of every Conv / Linear when nothing is masked (channel members)."""
    layers = P.masked_layers(net) or [m for m in net.modules() if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear))]
    return sum(m.weight.abs().sum() for m in layers)


def eed_loss(m: nn.Module, x: Tensor, y: Tensor, *, attack: Attack, space: InputSpace, ratio: float,
             diversity: float, misclassified_weight: float, l1: float) -> tuple[Tensor, Tensor]:
    """The EED objective on one batch; ``m`` is the Ensemble (or its DDP wrapper)."""
    net = m.module if hasattr(m, "module") and isinstance(m, torch.nn.parallel.DistributedDataParallel) else m
    members = (net.members if isinstance(net, Ensemble) else None)
    num_classes = y.shape[1] - len(members) if y.ndim == 2 and members is not None else None
    y, share = split_target(y, num_classes) if num_classes is not None else (y, None)
    x_adv = attack(net, x, y, space)  # against the whole ensemble, model in eval mode
    zs = m(x_adv, True)  # (K, N, C), in training mode
    probs = F.softmax(zs.float(), dim=-1).mean(0)
    w = 1.0 + misclassified_weight * (probs.argmax(-1) != y).float().detach()

    def member_ce(z: Tensor, k: int, weight: Tensor | None) -> Tensor:
        per = F.cross_entropy(z.float(), y, reduction="none") * (weight if weight is not None else 1.0)
        if share is None:
            return per.mean()
        return (per * share[k]).sum() / share[k].sum().clamp_min(1.0)  # member k's own samples only

    ce = torch.stack([member_ce(z, k, w) for k, z in enumerate(zs)]).mean()
    if ratio < 1.0:
        ce_clean = torch.stack([member_ce(z, k, None) for k, z in enumerate(m(x, True))]).mean()
        ce = ratio * ce + (1.0 - ratio) * ce_clean
    loss = ce
    if diversity > 0:
        loss = loss + diversity * diversity_loss(zs, y)
    if l1 > 0:
        loss = loss + l1 * l1_of_kept(net)
    return loss, torch.log(probs.clamp_min(1e-12))


@torch.no_grad()
def member_probs(model: Ensemble, dataset, device, batch_size: int = 256) -> tuple[Tensor, Tensor]:
    """(K, N, C) member probabilities and (N,) labels on ``dataset``, eval mode."""
    modes = [(mod, mod.training) for mod in model.modules()]
    model.eval()
    ps, ys = [], []
    try:
        for x, y in torch.utils.data.DataLoader(dataset, batch_size=batch_size):
            ps.append(F.softmax(model(x.to(device), True).float(), dim=-1).cpu())
            ys.append(y)
    finally:
        for mod, mode in modes:
            mod.training = mode
    return torch.cat(ps, dim=1), torch.cat(ys)


def _mask_members(model: Ensemble, cfg, ctx, batches) -> None:
    """Step 2, unstructured: member k keeps the weights score k ranks highest, exactly target_sparsity pruned."""
    for k, (score, mem) in enumerate(zip(cfg.scores, model.members)):
        layers = P.prunable_layers(mem, include_first_last=cfg.prune_first_last)
        scores = I.compute_scores(score, mem, layers, batches=batches, seed=ctx.seed + k)
        # weights the input model had already pruned stay pruned (their score is masked to 0)
        P.update_masks(layers, cfg.target_sparsity, scope=cfg.scope, scores=scores)
    P.apply_masks(model)
    pruned = [[m.weight_mask for m in P.masked_layers(mem)] for mem in model.members]
    overlaps = [I.mask_overlap(pruned[i], pruned[j]) for i in range(len(pruned)) for j in range(i + 1, len(pruned))]
    ctx.record(event="eed_masks", scores=list(cfg.scores), sparsity=cfg.target_sparsity, pruned_overlap=overlaps)
    ctx.log(f"eed: {len(cfg.scores)} sub-models ({', '.join(cfg.scores)}) at sparsity {cfg.target_sparsity}; "
            f"pruned-set overlaps {[round(o, 3) for o in overlaps]}")


def _kept_channels(history, sizes: dict) -> dict:
    """Original indices of the channels Torch-Pruning kept, per (root layer, out?) of its pruning history
    (each entry's indices are positions in the tensor as it was at that step)."""
    kept: dict = {}
    for name, is_out, idxs in history:
        key = (name, bool(is_out))
        if key not in sizes:
            continue
        drop = {int(i) for i in idxs}
        kept[key] = [c for j, c in enumerate(kept.get(key, range(sizes[key]))) if j not in drop]
    return kept


def _channel_overlap(a: dict, b: dict, sizes: dict) -> float:
    """Share of removed channels two members have in common (Jaccard of the removed sets, over all layers)."""
    inter = union = 0
    for key in set(a) | set(b):
        ra = set(range(sizes[key])) - set(a.get(key, range(sizes[key])))
        rb = set(range(sizes[key])) - set(b.get(key, range(sizes[key])))
        inter, union = inter + len(ra & rb), union + len(ra | rb)
    return inter / union if union else 1.0


def _shrink_members(model: Ensemble, cfg, ctx, batches) -> None:
    """Step 2, channels: member k loses the channels score k ranks lowest (Torch-Pruning groups, edgec.channels)
    until its MACs are at most ``target_macs`` of the input's; the shapes go to the stage's arch record."""
    from edgec import architecture as A
    from edgec import channels as C
    from edgec.capture import example_input
    from edgec.errors import BudgetExceeded

    example = example_input(ctx, batch=1).to(ctx.device)
    macs0, params0 = C.count(model.members[0], example)
    sizes = {(n, out): int(m.weight.shape[0 if out else 1]) for n, m in model.members[0].named_modules()
             if isinstance(getattr(m, "weight", None), torch.Tensor) and m.weight.dim() >= 2 for out in (True, False)}
    rows, kept = [], []
    for k, (score, mem) in enumerate(zip(cfg.scores, model.members)):
        ignored, _ = C.protected_layers(mem, example, prune_first_last=cfg.prune_first_last)
        imp = C.make_importance(score, batches_fn=lambda step: batches, seed=ctx.seed + k)
        pruner = C.build_pruner(mem, example, imp, ignored=ignored, global_pruning=cfg.scope == "global",
                                round_to=cfg.round_to, max_layer_ratio=0.9, resolution=100)

        def refresh(step, mem=mem, imp=imp, score=score):
            if score == "taylor":
                C.taylor_gradients(mem, batches, ctx.device)
            elif isinstance(imp, C.RegistryImportance):
                imp.refresh(mem, step)

        macs, params, held = C.prune_until(pruner, mem, example, lambda m, p: m <= cfg.target_macs * macs0,
                                           refresh=refresh)
        if not held:
            raise BudgetExceeded(f"eed member {k} ({score}) reached {macs / macs0:.3f} of the input's MACs, not "
                                 f"target_macs={cfg.target_macs} (at most 90% of a layer's channels go; the first "
                                 "and last layer stay)", hint="raise target_macs, or set prune_first_last: true")
        kept.append(_kept_channels(pruner.pruning_history(), sizes))
        rows.append({"score": score, "macs": macs, "params": params, "macs_ratio": macs / macs0,
                     "params_ratio": params / params0})
    overlaps = [_channel_overlap(kept[i], kept[j], sizes) for i in range(len(kept)) for j in range(i + 1, len(kept))]
    ctx.record(event="eed_channels", scores=list(cfg.scores), target_macs=cfg.target_macs, input_macs=macs0,
               input_params=params0, members=rows, removed_overlap=overlaps)
    ctx.log(f"eed: {len(rows)} channel-pruned sub-models ({', '.join(cfg.scores)}): MACs "
            f"{[round(r['macs_ratio'], 3) for r in rows]} of the input's {macs0:,}; removed-channel overlaps "
            f"{[round(o, 3) for o in overlaps]}")
    if ctx.dist.rank == 0:
        A.save(model, A.stage_path(ctx.run_dir, ctx.index))


class EEDHandler:
    def prepare(self, model, cfg, ctx):
        members = [copy.deepcopy(model) for _ in cfg.scores]
        if cfg.structure == "channel":
            ens = Ensemble(members).to(next(model.parameters()).device)
            if ctx.rebuild:  # replay: the members take their shrunk shapes, load_state_dict the values
                from edgec import architecture as A

                A.apply(ens, A.load(A.stage_path(ctx.run_dir, ctx.index)))
            return ens
        for mem in members:
            P.ensure_masks(P.prunable_layers(mem, include_first_last=cfg.prune_first_last))
        return Ensemble(members).to(next(model.parameters()).device)

    def run(self, model: Ensemble, cfg, ctx):
        from edgec.engine import Hooks, fit
        from edgec.runtime.ensemble import calibrate_threshold, early_exit

        train_set, held = holdout_split(ctx.data.train, cfg.calibration_fraction, seed=ctx.seed)
        train_set = _subset(train_set, cfg.max_train_samples, ctx.seed)

        # 2. one importance score per member, on the same few batches
        batches = I.sample_batches(train_set, cfg.importance_batches, cfg.batch_size, seed=ctx.seed + ctx.index)
        if cfg.structure == "channel":
            _shrink_members(model, cfg, ctx, batches)
        else:
            _mask_members(model, cfg, ctx, batches)

        # 3. adversarial fine-tuning of all members together
        if cfg.member_subset is not None:
            train_set = MemberSubsets(train_set, ctx.data.num_classes, len(cfg.scores), cfg.member_subset, ctx.seed)
            ctx.log(f"eed: each sub-model learns from its own {cfg.member_subset:.0%} share of the training samples")
        attack, space = Attack.from_config(cfg.adversarial), InputSpace.from_bundle(ctx.data)

        def loss_fn(m, x, y):
            return eed_loss(m, x, y, attack=attack, space=space, ratio=cfg.adversarial.ratio,
                            diversity=cfg.diversity, misclassified_weight=cfg.misclassified_weight, l1=cfg.l1)

        metrics = {}
        if cfg.epochs > 0:
            hooks = Hooks(after_backward=lambda: P.mask_gradients(model), after_step=lambda: P.apply_masks(model))
            metrics = fit(model, loss_fn=loss_fn, train_set=train_set, eval_set=ctx.data.eval,
                          cfg=train_config(cfg, ctx), ckpt_path=ctx.ckpt_path, resume=ctx.resume, hooks=hooks,
                          augment=ctx.data.augment, metrics_path=ctx.metrics_path, desc=f"stage {ctx.index} eed",
                          dist=ctx.dist)

        # 4. early-exit threshold on held-out data
        probs, labels = member_probs(model, held, ctx.device)
        cal = calibrate_threshold(probs.numpy(), labels.numpy(), target_accuracy=cfg.target_accuracy,
                                  tolerance=cfg.accuracy_tolerance, agree=cfg.agree)
        model.threshold.fill_(cal["threshold"])
        member_acc = [float((p.argmax(-1) == labels).float().mean()) for p in probs]
        _, used, _ = early_exit(probs.numpy(), threshold=cal["threshold"], agree=cfg.agree)
        ctx.record(event="eed_calibration", held_out=len(held), member_accuracy=member_acc, **cal)
        ctx.log(f"eed: held-out ({len(held)}) member acc {[round(a, 3) for a in member_acc]}, full ensemble "
                f"{cal['full_accuracy']:.3f}; threshold {cal['threshold']:.4f} -> dynamic acc {cal['accuracy']:.3f} "
                f"with {float(used.mean()):.2f} of {len(cfg.scores)} sub-models on average")
        return {**metrics, "eed_threshold": cal["threshold"], "eed_avg_members": cal["avg_members"],
                "eed_heldout_full_acc": cal["full_accuracy"], "eed_heldout_dynamic_acc": cal["accuracy"]}

    def convert(self, model, cfg, ctx):
        return model


register_stage("eed", EEDStage, EEDHandler())
