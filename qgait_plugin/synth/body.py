"""An articulated 3D body and its walking kinematics, as capsules per frame.

Why capsules: a capsule (a segment with a radius) projects orthographically to a 2D capsule with
the same radius, so rendering a silhouette from any view reduces to a distance test on the pixel
grid (see :mod:`render`). Anisotropic parts (a torso wider than it is deep) are built from several
capsules, so the outline changes with the view angle the way a real body's does.

Identity lives in :class:`Subject`: body proportions plus a walking style (stride, cadence, arm
swing, lean, sway, phase offsets, asymmetries), drawn from overlapping distributions so that no
single number identifies a person. :class:`Sequence` adds what changes between two walks of the
same person (speed, start phase, small style wobble, carried bag, coat). Heights are normalised
away by OpenGait's pretreatment, so only ratios and motion carry identity, as in real data.

Body frame: x forward (walking direction), y to the person's left, z up; lengths in body heights.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Dict, Tuple

import numpy as np
import torch

#: Bag kinds a subject may carry in ``bg`` sequences.
BAG_KINDS = ("backpack", "shoulder", "hand")


@dataclass(frozen=True)
class Subject:
    """One person: proportions (fractions of height) and walking style (angles in radians)."""

    # proportions
    thigh: float
    shin: float
    ankle_h: float
    foot: float
    torso: float
    neck: float
    head_r: float
    shoulder_w: float
    hip_w: float
    upper_arm: float
    forearm: float
    r_thigh: float
    r_shin: float
    r_arm: float
    r_depth: float
    r_side: float
    belly: float
    # style
    hip_amp: float
    hip_off: float
    hip_h2: float
    knee_swing: float
    knee_stance: float
    knee_lag: float
    cycle: float  # frames per gait cycle at 25 fps
    arm_amp: float
    arm_off: float
    arm_lag: float
    arm_abd: float
    elbow: float
    elbow_amp: float
    lean: float
    head_fwd: float
    sway: float
    pelvis_rot: float
    shoulder_rot: float
    step_abd: float
    asym_phase: float
    asym_amp: float
    toe_out: float
    # carried things (used by bg / cl sequences only)
    bag_kind: str = "backpack"
    bag_side: float = 1.0
    bag_size: float = 1.0
    coat_len: float = 0.8
    coat_thick: float = 0.03


#: (mean, sd) of each numeric subject field; sd is scaled by ``spread``. Angles in degrees here.
SUBJECT_DIST: Dict[str, Tuple[float, float]] = {
    "thigh": (0.245, 0.012), "shin": (0.245, 0.012), "ankle_h": (0.04, 0.004),
    "foot": (0.14, 0.01), "torso": (0.29, 0.014), "neck": (0.05, 0.008),
    "head_r": (0.062, 0.005), "shoulder_w": (0.125, 0.011), "hip_w": (0.085, 0.009),
    "upper_arm": (0.185, 0.01), "forearm": (0.17, 0.01), "r_thigh": (0.05, 0.007),
    "r_shin": (0.034, 0.004), "r_arm": (0.028, 0.004), "r_depth": (0.075, 0.01),
    "r_side": (0.05, 0.008), "belly": (0.02, 0.015),
    "hip_amp": (22.0, 3.5), "hip_off": (4.0, 3.0), "hip_h2": (0.0, 0.12),
    "knee_swing": (55.0, 7.0), "knee_stance": (12.0, 5.0), "knee_lag": (-25.0, 10.0),
    "cycle": (27.0, 2.5), "arm_amp": (20.0, 8.0), "arm_off": (2.0, 4.0), "arm_lag": (0.0, 15.0),
    "arm_abd": (8.0, 4.0), "elbow": (15.0, 8.0), "elbow_amp": (15.0, 7.0), "lean": (4.0, 3.0),
    "head_fwd": (0.01, 0.015), "sway": (0.015, 0.006), "pelvis_rot": (6.0, 2.5),
    "shoulder_rot": (5.0, 2.5), "step_abd": (2.0, 1.5), "asym_phase": (0.0, 8.0),
    "asym_amp": (0.0, 0.08), "toe_out": (8.0, 5.0),
}
_ANGLE_FIELDS = {
    "hip_amp", "hip_off", "knee_swing", "knee_stance", "knee_lag", "arm_amp", "arm_off",
    "arm_lag", "arm_abd", "elbow", "elbow_amp", "lean", "pelvis_rot", "shoulder_rot",
    "step_abd", "asym_phase", "toe_out",
}
#: lower bounds that keep a drawn body physically sensible
_FLOORS = {"arm_amp": 2.0, "r_arm": 0.018, "r_shin": 0.022, "r_thigh": 0.03, "r_depth": 0.045,
           "r_side": 0.03, "belly": 0.0, "cycle": 20.0, "hip_amp": 12.0, "knee_swing": 30.0,
           "knee_stance": 0.0, "elbow": 0.0, "elbow_amp": 0.0, "sway": 0.0, "pelvis_rot": 0.0,
           "shoulder_rot": 0.0, "neck": 0.02}


def sample_subject(rng: np.random.Generator, spread: float = 1.0) -> Subject:
    """Draw one person. ``spread`` scales between-subject variation (smaller = harder to tell apart)."""
    vals: Dict[str, Any] = {}
    for name, (mean, sd) in SUBJECT_DIST.items():
        v = mean + spread * sd * float(np.clip(rng.standard_normal(), -2.5, 2.5))
        v = max(v, _FLOORS.get(name, -math.inf))
        vals[name] = math.radians(v) if name in _ANGLE_FIELDS else v
    vals["bag_kind"] = BAG_KINDS[int(rng.integers(len(BAG_KINDS)))]
    vals["bag_side"] = 1.0 if rng.random() < 0.5 else -1.0
    vals["bag_size"] = float(rng.uniform(0.8, 1.25))
    vals["coat_len"] = float(rng.uniform(0.55, 1.0))
    vals["coat_thick"] = float(rng.uniform(0.02, 0.045))
    return Subject(**vals)


def wobble_subject(subject: Subject, rng: np.random.Generator, amount: float) -> Subject:
    """Per-sequence style variation: each style value moves by ``amount`` times its population sd."""
    style = {"hip_amp", "hip_off", "knee_swing", "knee_stance", "arm_amp", "arm_off", "elbow",
             "elbow_amp", "lean", "head_fwd", "sway", "pelvis_rot", "shoulder_rot", "arm_abd"}
    changes = {}
    for name in sorted(style):
        sd = SUBJECT_DIST[name][1]
        if name in _ANGLE_FIELDS:
            sd = math.radians(sd)
        v = getattr(subject, name) + amount * sd * float(rng.standard_normal())
        floor = _FLOORS.get(name)
        if floor is not None:
            v = max(v, math.radians(floor) if name in _ANGLE_FIELDS else floor)
        changes[name] = v
    return replace(subject, **changes)


@dataclass(frozen=True)
class Sequence:
    """What one walk adds to the subject: speed, start phase, carried bag, coat."""

    speed: float = 1.0
    phase0: float = 0.0
    bag: bool = False
    coat: bool = False


def _rot_z(v: torch.Tensor, ang: torch.Tensor) -> torch.Tensor:
    """Rotate ``[..., 3]`` vectors about z by ``ang`` (broadcast over leading dims)."""
    c, s = torch.cos(ang), torch.sin(ang)
    x, y, z = v.unbind(-1)
    return torch.stack((c * x - s * y, s * x + c * y, z), -1)


def _dir(pitch: torch.Tensor, lateral: torch.Tensor) -> torch.Tensor:
    """Unit vector hanging down, swung forward by ``pitch`` and sideways by ``lateral`` (radians)."""
    return torch.stack((torch.sin(pitch) * torch.cos(lateral), torch.sin(lateral),
                        -torch.cos(pitch) * torch.cos(lateral)), -1)


def walk_capsules(subject: Subject, seq: Sequence, frames: int
                  ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Capsules of the walking body over ``frames`` frames.

    Returns ``(p0, p1, r)``: segment end points ``[frames, K, 3]`` and radii ``[K]`` in body
    heights, body frame (pelvis at height of the hips, above the origin).
    """
    s = subject
    t = torch.arange(frames, dtype=torch.float64)
    cycle = s.cycle / math.sqrt(seq.speed)
    phi = seq.phase0 + 2 * math.pi * t / cycle
    stride = seq.speed ** 0.7
    zeros = torch.zeros_like(phi)
    one = torch.ones_like(phi)

    # pelvis and trunk
    pelvis = torch.stack((zeros, s.sway * torch.cos(phi), one * (s.thigh + s.shin + s.ankle_h)), -1)
    prot = s.pelvis_rot * stride * torch.sin(phi)
    srot = -s.shoulder_rot * stride * torch.sin(phi)
    lean = s.lean + 0.02 * (seq.speed - 1.0)
    spine = torch.tensor((math.sin(lean), 0.0, math.cos(lean)), dtype=torch.float64)
    neck = pelvis + s.torso * spine
    lat = torch.tensor((0.0, 1.0, 0.0), dtype=torch.float64)
    hip_l = pelvis + _rot_z((s.hip_w * lat).expand(frames, 3), prot)
    hip_r = pelvis - (hip_l - pelvis)
    sh_off = _rot_z((s.shoulder_w * lat).expand(frames, 3), srot)
    sh_base = neck - 0.03 * spine
    sh_l, sh_r = sh_base + sh_off, sh_base - sh_off
    head_dir = spine + torch.tensor((s.head_fwd * 4, 0.0, 0.0), dtype=torch.float64)
    head_dir = head_dir / head_dir.norm()
    head_base = neck + s.neck * head_dir
    head_c = head_base + s.head_r * 0.9 * head_dir

    caps = []  # (p0 [T,3], p1 [T,3], radius)

    def add(a, b, r):
        caps.append((a.expand(frames, 3), b.expand(frames, 3), float(r)))

    # legs: left leads with phase phi, right with phi + pi (+ asymmetry)
    feet = {}
    for side, ph, amp_scale in ((1.0, phi, 1.0 + s.asym_amp),
                                (-1.0, phi + math.pi + s.asym_phase, 1.0 - s.asym_amp)):
        hip = hip_l if side > 0 else hip_r
        theta = s.hip_off + stride * amp_scale * s.hip_amp * (torch.sin(ph) + s.hip_h2 * torch.sin(2 * ph))
        bump = ((1 + torch.cos(ph - s.knee_lag)) / 2) ** 3
        kappa = s.knee_stance + stride * s.knee_swing * bump
        knee = hip + s.thigh * _dir(theta, side * s.step_abd * one)
        ankle = knee + s.shin * _dir(theta - kappa, side * s.step_abd * one)
        foot_pitch = 0.5 * (theta - kappa) - 0.35 * torch.cos(ph)
        toe_dir = torch.stack((torch.cos(foot_pitch) * math.cos(s.toe_out),
                               side * math.sin(s.toe_out) * one, -torch.sin(foot_pitch)), -1)
        toe = ankle + s.foot * 0.75 * toe_dir
        heel = ankle - s.foot * 0.25 * toe_dir - torch.tensor((0, 0, s.ankle_h * 0.5),
                                                              dtype=torch.float64)
        add(hip, knee, s.r_thigh)
        add(knee, ankle, s.r_shin)
        add(heel, toe, 0.45 * s.ankle_h + 0.004)
        feet[side] = (hip, knee, theta)

    # arms swing against the leg of the same side
    hands = {}
    for side, ph in ((1.0, phi), (-1.0, phi + math.pi + s.asym_phase)):
        sh = sh_l if side > 0 else sh_r
        amp = s.arm_amp * stride
        if seq.bag and s.bag_kind in ("hand", "shoulder") and side == s.bag_side:
            amp = amp * (0.25 if s.bag_kind == "hand" else 0.6)
        psi = s.arm_off - amp * torch.sin(ph + s.arm_lag)
        eps = s.elbow + s.elbow_amp * (1 + torch.sin(-ph - s.arm_lag)) / 2
        if seq.bag and s.bag_kind == "hand" and side == s.bag_side:
            eps = eps * 0.3
        elbow = sh + s.upper_arm * _dir(psi, side * s.arm_abd * one)
        wrist = elbow + s.forearm * _dir(psi + eps, side * s.arm_abd * 0.5 * one)
        r_arm = s.r_arm + (s.coat_thick * 0.6 if seq.coat else 0.0)
        add(sh, elbow, r_arm)
        add(elbow, wrist, r_arm * 0.85)
        hands[side] = wrist

    # trunk and head
    r_depth = s.r_depth + (s.coat_thick if seq.coat else 0.0)
    add(pelvis, neck - 0.02 * spine, r_depth)
    add(hip_l, sh_l, s.r_side)
    add(hip_r, sh_r, s.r_side)
    add(sh_l, sh_r, 0.7 * s.r_side)
    add(hip_l, hip_r, s.r_thigh)
    fwd = torch.tensor((1.0, 0.0, 0.0), dtype=torch.float64)
    belly_c = pelvis + 0.35 * s.torso * spine + s.belly * fwd
    add(belly_c, belly_c + 0.15 * s.torso * spine, r_depth)
    add(neck - 0.02 * spine, head_base, 0.45 * s.head_r)
    add(head_c - 0.2 * s.head_r * head_dir, head_c + 0.2 * s.head_r * head_dir, s.head_r)

    if seq.coat:
        # a coat: wide body down to the hem, filling the gap between the thighs above it
        hl, kl, _ = feet[1.0]
        hr, kr, _ = feet[-1.0]
        hem_l = hl + s.coat_len * (kl - hl)
        hem_r = hr + s.coat_len * (kr - hr)
        rc = s.r_side + s.coat_thick
        add(sh_l, hem_l, rc)
        add(sh_r, hem_r, rc)
        add(hem_l, hem_r, 0.8 * rc)
        add(pelvis, 0.5 * (hem_l + hem_r), r_depth + 0.01)
        add(sh_l, sh_r, 0.7 * s.r_side + s.coat_thick)

    if seq.bag:
        k, side, size = s.bag_kind, s.bag_side, s.bag_size
        if k == "backpack":
            back = -(r_depth + 0.03 * size)
            top = neck - 0.05 * spine + back * fwd
            bot = pelvis + 0.35 * s.torso * spine + back * fwd
            for off in (0.05 * size, -0.05 * size):
                o = _rot_z((off * lat).expand(frames, 3), srot)
                add(top + o, bot + o, 0.035 * size)
        elif k == "shoulder":
            hip = hip_l if side > 0 else hip_r
            swing = 0.02 * torch.sin(2 * phi)[:, None] * fwd
            c = hip + side * (s.r_side + 0.04 * size) * lat - 0.01 * fwd + swing
            add(c - 0.05 * size * fwd, c + 0.05 * size * fwd, 0.045 * size)
        else:  # hand bag hanging from the wrist
            w = hands[side]
            down = torch.tensor((0.0, 0.0, -1.0), dtype=torch.float64)
            add(w + 0.03 * down - 0.04 * size * fwd, w + 0.03 * down + 0.04 * size * fwd, 0.04 * size)

    p0 = torch.stack([c[0] for c in caps], 1)
    p1 = torch.stack([c[1] for c in caps], 1)
    r = torch.tensor([c[2] for c in caps], dtype=torch.float64)
    return p0, p1, r
