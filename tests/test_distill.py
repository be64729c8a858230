"""IDD loss, the frozen FP teacher and the QAT parameter groups (``quant.idd.params``)."""
import copy
import io
import math
import threading
import warnings

import pytest
import torch
from torch import nn

from qgait_plugin import ConfigError, iter_quantizers, quantize_model
from qgait_plugin.compat import load_weights_only
from qgait_plugin.distill import IDDLoss, part_distances
from qgait_plugin.param_groups import qat_param_groups
from qgait_plugin.teacher import SHARED_WITH_STUDENT, FrozenTeacher, attach_teacher, get_teacher, make_teacher

CRITERIA = ("smooth_l1", "l1", "l2")


def labels_pk(p=4, k=3):
    return torch.arange(p).repeat_interleave(k)


class TinyGait(nn.Module):
    """Conv + BN backbone with horizontal part pooling: embeddings ``[n, c, p]`` like OpenGait's."""

    def __init__(self, parts: int = 4) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                      nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.fc = nn.Linear(16, 12)
        self.parts = parts

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.backbone(x)  # [n, 16, h, w]
        n, c, h, w = f.shape
        f = f.view(n, c, self.parts, h // self.parts, w).mean(dim=(3, 4))  # [n, 16, p]
        return self.fc(f.transpose(1, 2)).transpose(1, 2)  # [n, 12, p]


def fp_and_student(bits=4):
    torch.manual_seed(1)
    fp = TinyGait()
    with torch.no_grad():  # non-trivial BN statistics, so eval-mode behaviour is visible
        for m in fp.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
    fp_sd = copy.deepcopy(fp.state_dict())
    student = quantize_model(copy.deepcopy(fp), {"weight": {"bits": bits}, "act": {"bits": bits}})
    x = torch.rand(12, 1, 8, 6)
    student.train()
    student(x)  # initialise the activation steps on a first batch
    return fp, fp_sd, student, x


# --------------------------------------------------------------------------------------------
# the loss


@pytest.mark.parametrize("criterion", CRITERIA)
def test_zero_for_equal_and_positively_scaled_student(criterion):
    idd = IDDLoss(criterion=criterion)
    t = torch.randn(12, 16, 4)
    y = labels_pk()
    for scale in (1.0, 1e-3, 0.37, 5.0, 1e3):
        loss, info = idd(t * scale, t, y)
        assert loss.item() < 1e-6, (scale, loss.item())  # float32 rounding only
        assert info["rel_gap"].item() < 1e-5
        assert math.isclose(info["dist_student"].item(), scale * info["dist_teacher"].item(), rel_tol=1e-4)
    # a student that differs from the teacher by more than a scale costs something
    loss, _ = idd(t + 0.5 * torch.randn_like(t), t, y)
    assert loss.item() > 1e-4


@pytest.mark.parametrize("criterion", CRITERIA)
def test_one_sgd_step_moves_student_toward_teacher_geometry(criterion):
    idd = IDDLoss(criterion=criterion)
    t = torch.randn(12, 16, 4)
    y = labels_pk()
    s = torch.randn(12, 16, 4, requires_grad=True)
    loss0, info0 = idd(s, t, y)
    assert loss0.item() > 0
    loss0.backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    with torch.no_grad():
        s -= 0.5 * s.grad / s.grad.norm()  # one normalised SGD step
    loss1, info1 = idd(s, t, y)
    assert loss1.item() < loss0.item()
    assert info1["rel_gap"].item() < info0["rel_gap"].item()
    # the teacher is a target: no gradient reaches it
    t2 = t.clone().requires_grad_()
    idd(s.detach().requires_grad_(), t2, y)[0].backward()
    assert t2.grad is None


def _move_within_class(x, labels, cls):
    """Rotate the members of class ``cls`` inside the orthogonal complement of every other sample:
    distances to other classes are preserved, distances inside ``cls`` change."""
    n, c, p = x.shape
    out = x.clone()
    others = labels != cls
    for part in range(p):
        basis = torch.linalg.qr(x[others, :, part].T, mode="complete").Q  # [c, c]
        k = int(others.sum())
        comp = basis[:, k:]  # orthogonal complement of the other classes' span
        for i in torch.nonzero(labels == cls).flatten().tolist():
            coeff = comp.T @ x[i, :, part]
            rot = torch.linalg.qr(torch.randn(c - k, c - k, dtype=x.dtype)).Q
            out[i, :, part] = x[i, :, part] - comp @ coeff + comp @ (rot @ coeff)
    return out


@pytest.mark.parametrize("criterion", CRITERIA)
def test_same_label_pairs_do_not_count(criterion):
    torch.manual_seed(3)
    idd = IDDLoss(criterion=criterion)
    y = torch.tensor([0, 0, 0, 1, 1, 2, 2])
    s = torch.randn(7, 16, 2, dtype=torch.float64)
    t = torch.randn(7, 16, 2, dtype=torch.float64)
    s2 = _move_within_class(s, y, 0)
    d1, d2 = part_distances(s).mean(0), part_distances(s2).mean(0)
    inter = y[:, None] != y[None, :]
    same0 = (y[:, None] == 0) & (y[None, :] == 0) & ~torch.eye(7, dtype=torch.bool)
    assert torch.allclose(d1[inter], d2[inter], atol=1e-5)  # the construction keeps inter-class distances
    assert (d1[same0] - d2[same0]).abs().max() > 1e-2  # and really changes the intra-class ones
    base = idd(s, t, y)[0].item()
    assert idd(s2, t, y)[0].item() == pytest.approx(base, rel=1e-5, abs=1e-9)
    assert idd(s, _move_within_class(t, y, 0), y)[0].item() == pytest.approx(base, rel=1e-5, abs=1e-9)
    # the same change counts once the labels make those pairs inter-class
    y_all_diff = torch.arange(7)
    assert abs(idd(s2, t, y_all_diff)[0].item() - idd(s, t, y_all_diff)[0].item()) > 1e-6


def test_pair_fraction_weight_and_two_dim_embeddings():
    t = torch.randn(12, 16, 4)
    s = torch.randn(12, 16, 4)
    y = labels_pk(4, 3)  # 12 * 9 inter-class ordered pairs of 12 * 11
    loss1, info = IDDLoss(weight=1.0)(s, t, y)
    assert info["pair_fraction"].item() == pytest.approx(9 / 11)
    loss3, info3 = IDDLoss(weight=3.0)(s, t, y)
    assert loss3.item() == pytest.approx(3 * loss1.item(), rel=1e-6)
    assert info3["loss"].item() == pytest.approx(loss3.item())
    flat, _ = IDDLoss()(s[:, :, 0], t[:, :, 0], y)
    one_part, _ = IDDLoss()(s[:, :, :1], t[:, :, :1], y)
    assert flat.item() == pytest.approx(one_part.item(), rel=1e-6)


def test_part_distances_per_part_exact_on_the_diagonal():
    x = torch.randn(5, 7, 3)
    want = torch.stack([torch.cdist(x[:, :, k], x[:, :, k]) for k in range(3)])
    d = part_distances(x)
    assert d.shape == (3, 5, 5) and torch.allclose(d, want, atol=1e-5)
    assert torch.equal(d.diagonal(dim1=1, dim2=2), torch.zeros(3, 5))
    x.requires_grad_(True)
    part_distances(x).sum().backward()  # zero distances on the diagonal: a finite gradient, no epsilon
    assert torch.isfinite(x.grad).all()


def test_rejects_bad_inputs():
    with pytest.raises(ValueError, match="criterion"):
        IDDLoss(criterion="cosine")
    with pytest.raises(ValueError, match="weight"):
        IDDLoss(weight=-1)
    idd = IDDLoss()
    with pytest.raises(ValueError, match="same shape"):
        idd(torch.randn(4, 8, 2), torch.randn(4, 8, 3), torch.arange(4))
    with pytest.raises(ValueError, match="labels"):
        idd(torch.randn(4, 8, 2), torch.randn(4, 8, 2), torch.arange(5))


def _edge_cases():
    torch.manual_seed(5)
    t = torch.randn(8, 16, 4)
    y = labels_pk(4, 2)
    base = torch.randn(4, 16, 4)
    yield "one label", torch.randn(8, 16, 4), t, torch.zeros(8, dtype=torch.long)
    yield "single sample", torch.randn(1, 16, 4), t[:1], torch.tensor([3])
    yield "duplicates across classes", torch.cat([base, base]), t, y
    yield "duplicates within classes", base.repeat_interleave(2, 0), t, y
    yield "collapsed student", torch.zeros(8, 16, 4), t, y
    yield "collapsed teacher", torch.randn(8, 16, 4), torch.ones(8, 16, 4), y
    yield "bfloat16", torch.randn(8, 16, 4, dtype=torch.bfloat16), t, y
    yield "float16 student, bfloat16 teacher", torch.randn(8, 16, 4, dtype=torch.float16), t.bfloat16(), y
    yield "bfloat16 duplicates", torch.cat([base, base]).bfloat16(), t.bfloat16(), y


@pytest.mark.parametrize("case", list(_edge_cases()), ids=lambda c: c[0])
@pytest.mark.parametrize("criterion", CRITERIA)
def test_edge_cases_give_finite_loss_and_gradient(case, criterion):
    name, s, t, y = case
    s = s.clone().requires_grad_()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # detect_anomaly announces itself
        with torch.autograd.detect_anomaly():
            loss, info = IDDLoss(criterion=criterion)(s, t, y)
            loss.backward()
    assert loss.dtype == torch.float32
    assert torch.isfinite(loss)
    assert all(torch.isfinite(v) for v in info.values()), info
    assert s.grad is not None and s.grad.dtype == s.dtype and torch.isfinite(s.grad).all()
    if name in ("one label", "single sample"):
        assert loss.item() == 0.0 and s.grad.abs().max().item() == 0.0
        assert info["pair_fraction"].item() == 0.0


def test_autocast_region_computes_in_float32():
    t = torch.randn(8, 16, 4)
    s = torch.randn(8, 16, 4, requires_grad=True)
    y = labels_pk(4, 2)
    ref, _ = IDDLoss()(s, t, y)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = IDDLoss()(s, t, y)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(ref.item(), rel=1e-6)


def test_from_config():
    idd = IDDLoss.from_config({"idd": {"weight": 0.5, "criterion": "l1"}})
    assert (idd.weight, idd.criterion) == (0.5, "l1")


# --------------------------------------------------------------------------------------------
# the teacher


def test_teacher_is_the_fp_model_in_eval_mode():
    fp, fp_sd, student, x = fp_and_student()
    teacher = make_teacher(student, fp_sd)
    fp.eval()
    out = teacher(x)
    assert out.requires_grad is False and out.grad_fn is None
    assert torch.allclose(out, fp(x), atol=1e-6)
    student.eval()
    assert (student(x) - out).abs().max() > 1e-3  # the student is quantized, the teacher is not
    assert not any(True for _ in iter_quantizers(teacher.module))
    assert all(not p.requires_grad for p in teacher.parameters())


def test_teacher_stays_out_of_student_and_optimizer_and_does_not_train():
    fp, fp_sd, student, x = fp_and_student()
    keys_before = set(student.state_dict())
    n_params_before = sum(p.numel() for p in student.parameters())
    teacher = make_teacher(student, fp_sd)
    attach_teacher(student, teacher)
    assert get_teacher(student) is teacher
    assert set(student.state_dict()) == keys_before
    assert sum(p.numel() for p in student.parameters()) == n_params_before
    assert not any(isinstance(m, FrozenTeacher) or m is teacher.module for m in student.modules())
    teacher_ids = {id(p) for p in teacher.parameters()}
    assert not teacher_ids & {id(p) for p in student.parameters()}
    opt = torch.optim.SGD(student.parameters(), lr=0.1, momentum=0.9)
    assert not teacher_ids & {id(p) for g in opt.param_groups for p in g["params"]}
    teacher_before = {k: v.clone() for k, v in teacher.state_dict().items()}
    assert teacher_before
    student_before = {k: v.clone() for k, v in student.state_dict().items()
                      if isinstance(v, torch.Tensor) and v.is_floating_point()}

    student.train()
    assert not teacher.training and not teacher.module.training
    idd = IDDLoss()
    for _ in range(2):
        opt.zero_grad()
        loss, _ = idd(student(x), teacher(x), labels_pk())
        (loss + student(x).pow(2).mean()).backward()
        opt.step()
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, teacher_before[k]), k  # weights and BN running statistics unchanged
    assert any(not torch.equal(v, student_before[k]) for k, v in student.state_dict().items() if k in student_before)
    # a state dict round trip of the student carries no teacher
    buf = io.BytesIO()
    torch.save(student.state_dict(), buf)
    buf.seek(0)
    assert set(load_weights_only(buf)) == keys_before


def test_teacher_follows_the_student_and_stays_in_eval():
    fp, fp_sd, student, x = fp_and_student()
    teacher = make_teacher(student, fp_sd)
    attach_teacher(student, teacher)
    student.to(torch.float64)  # eager: attach_teacher moves it with the student
    assert all(p.dtype == torch.float64 for p in teacher.parameters())
    student.to("cpu").float()
    assert all(p.dtype == torch.float32 for p in teacher.parameters())
    teacher.module.train()  # someone switches it: the next call puts it back
    student.train()
    teacher(x)
    assert not teacher.module.training
    teacher.train()
    assert not teacher.training
    # without attach_teacher it catches up lazily, at its next call
    lazy = make_teacher(student, fp_sd)
    student.double()
    out = lazy(x.double())
    assert out.dtype == torch.float64 and all(p.dtype == torch.float64 for p in lazy.parameters())
    # a deep copy of the student (EMA, another teacher) shares the teacher instead of copying it
    twin = copy.deepcopy(student)
    assert get_teacher(twin) is teacher


def test_teacher_looks_through_a_parallel_wrapper():
    """DDP and DataParallel wrap the student; the teacher copies the inner model and stays out of
    the wrapper's parameters (DDP syncs exactly ``module.parameters()``). DataParallel stands in
    for DDP here: a real process group in a unit test can hang on a sandboxed host."""
    fp, fp_sd, student, x = fp_and_student()
    wrapped = nn.DataParallel(student)
    teacher = make_teacher(wrapped, fp_sd)
    attach_teacher(wrapped, teacher)
    assert get_teacher(wrapped) is get_teacher(student) is teacher
    assert not {id(p) for p in teacher.parameters()} & {id(p) for p in wrapped.parameters()}
    assert set(wrapped.state_dict()) == {f"module.{k}" for k in student.state_dict()}
    fp.eval()
    assert torch.allclose(teacher(x), fp(x), atol=1e-6)


class _Writer:
    """Stands in for a TensorBoard writer: holds a lock, so it cannot be deep-copied."""

    def __init__(self) -> None:
        self.lock = threading.Lock()


class _Holder:
    """A plain object that holds a module used in forward (the teacher needs its own copy)."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module


def test_make_teacher_shares_host_run_state_but_copies_the_network():
    fp, fp_sd, student, x = fp_and_student()
    # a host model (like OpenGait's BaseModel) carries its loader, optimizer and logger
    student.train_loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x), batch_size=4)
    student.optimizer = torch.optim.SGD(student.parameters(), lr=0.1)
    student.msg_mgr = _Writer()
    student.extra = _Holder(student.fc)
    teacher = make_teacher(student, fp_sd)
    t = teacher.module
    assert t.train_loader is student.train_loader and t.optimizer is student.optimizer
    assert t.msg_mgr is student.msg_mgr
    assert t.extra is not student.extra and t.extra.module is t.fc and t.fc is not student.fc
    fp.eval()
    assert torch.allclose(teacher(x), fp(x), atol=1e-6)
    # the rule is the list: a run-state object under another name is copied like everything else
    assert {"train_loader", "optimizer", "msg_mgr"} <= set(SHARED_WITH_STUDENT)
    student.logger = _Writer()
    with pytest.raises(TypeError):
        make_teacher(student, fp_sd)


def test_make_teacher_names_keys_that_do_not_fit():
    fp, fp_sd, student, x = fp_and_student()
    broken = dict(fp_sd)
    del broken["backbone.1.running_var"]
    with pytest.raises(ConfigError, match=r"backbone\.1\.running_var"):
        make_teacher(student, broken)
    extra = dict(fp_sd, **{"head.weight": torch.zeros(3)})
    with pytest.raises(ConfigError, match=r"head\.weight"):
        make_teacher(student, extra)
    # accepted forms: an OpenGait checkpoint, DDP prefixes, a state dict with quantizer keys
    ckpt = {"model": fp_sd, "optimizer": {}, "iteration": 10}
    prefixed = {f"module.{k}": v for k, v in fp_sd.items()}
    with_quant = student.state_dict()
    fp.eval()
    for sd in (ckpt, prefixed):
        assert torch.allclose(make_teacher(student, sd)(x), fp(x), atol=1e-6)
    make_teacher(student, with_quant)  # quantizer keys are skipped, the rest fits


# --------------------------------------------------------------------------------------------
# parameter groups


def test_param_groups_all_trains_everything_once():
    _, _, student, _ = fp_and_student()
    groups = qat_param_groups(student, "all")
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids))
    assert set(ids) == {id(p) for p in student.parameters() if p.requires_grad}
    assert groups.frozen == []
    steps = next(g for g in groups if g["name"] == "quantizer_steps")
    assert steps["weight_decay"] == 0.0
    assert {id(p) for p in steps["params"]} == {id(q.scaled_log_step) for _, q in iter_quantizers(student) if q.enabled}
    torch.optim.SGD(groups, lr=0.1, weight_decay=1e-4)  # torch accepts the groups as they are


def test_param_groups_quantizers_trains_only_steps_and_bn():
    fp, fp_sd, student, x = fp_and_student()
    trainable_before = {n for n, p in student.named_parameters() if p.requires_grad}
    groups = qat_param_groups(student, "quantizers")
    assert {g["name"] for g in groups} == {"quantizer_steps", "bn"}
    trainable = {n for n, p in student.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(".scaled_log_step") or n.startswith(("backbone.1.", "backbone.4."))
                             for n in trainable)
    assert set(groups.frozen) == trainable_before - trainable
    assert "fc.weight" in groups.frozen and "backbone.0.weight" in groups.frozen
    before = {n: p.detach().clone() for n, p in student.named_parameters()}
    opt = torch.optim.SGD(groups, lr=0.05)
    teacher = make_teacher(student, fp_sd)
    student.train()
    loss, _ = IDDLoss()(student(x), teacher(x), labels_pk())
    loss.backward()
    opt.step()
    for n, p in student.named_parameters():
        if not p.requires_grad:
            assert p.grad is None and torch.equal(p, before[n]), n
    assert any(not torch.equal(p, before[n]) for n, p in student.named_parameters() if n.endswith(".scaled_log_step"))


def test_param_groups_rejects_bad_requests():
    _, _, student, _ = fp_and_student()
    with pytest.raises(ConfigError, match=r"quant\.idd\.params\): 'weights' is not allowed"):
        qat_param_groups(student, "weights")
    with pytest.raises(ValueError, match="quantize_model"):
        qat_param_groups(TinyGait(), "quantizers")
