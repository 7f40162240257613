"""Every knob of training in one dataclass, loaded from YAML with ``key=value`` overrides.

``amft-vlm train --config configs/gp-l.yaml steps=200 controller.eta_mu=0.1`` reads the file,
applies the overrides (dotted keys reach nested sections) and validates the result; every error
names the field and what to write instead.

Config files and every ``key=value`` of the command line (overrides, ``--env-arg``) are read the
same way, as YAML 1.2 scalars (`parse_key_value`): ``0.5`` and ``1e-3`` are numbers, ``true`` and
``false`` booleans, ``null`` (or ``None``) is None, and anything else, ``no`` and ``abc`` included,
a string.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, get_type_hints

import yaml

from amft_vlm.run.safe_io import InputFileError, read_regular_bytes

ENTROPY_SOURCES = ("rollouts", "expert")
"""What the controller's entropy H and target H* are measured on (`ControllerConfig.entropy_source`)."""
LOOKAHEADS = ("adam", "sgd")
"""How the look-ahead parameters depend on mu (`ControllerConfig.lookahead`)."""
META_SIGNALS = ("standardized", "raw")
"""Forms of the meta-gradient signal (`ControllerConfig.meta_signal`)."""
META_CREDITS = ("episode", "turn")
"""How validation answers are credited in grad U (`ControllerConfig.meta_credit`, `amft_vlm.learning.meta.META_CREDITS`)."""


@dataclass(frozen=True)
class ControllerUse:
    """Which parts of the AMFT controller a method runs (all of them: AMFT itself); a `amft_vlm.learning.methods.Method`
    row's ``controller``, kept here so the config, the controller and the methods table share it from below."""

    warmup: bool = True
    """Pure SFT for ``controller.warmup_steps`` steps before the controller starts (else it runs from step 0)."""
    meta: bool = True
    """The meta-gradient term, every ``controller.meta_interval`` steps (validation episodes)."""
    entropy: bool = True
    """The entropy term, every controller step."""


@dataclass
class ControllerConfig:
    """The AMFT mu controller (see `amft_vlm.learning.controller`): `MuController`'s only settings and checks."""

    mu_init: float = 0.5
    """mu when the controller takes over after warm-up (the released configuration used 0.8 and 0.5)."""
    mu_min: float = 0.05
    """Lower clip of mu."""
    mu_max: float = 0.95
    """Upper clip of mu."""
    eta_mu: float = 0.01
    """Step size of the meta term. With ``meta_signal: standardized`` the signal is a t-statistic
    (clipped to +-meta_clip), so 0.01 moves mu by about 0.02 per meta step when the sign is clear
    (t ~ 2): 0.1-0.5 over a run of 10-25 meta steps. With ``raw`` it multiplies dU/dmu itself."""
    eta_h: float = 5e-4
    """Step size of the entropy term (per nat of H* - H)."""
    warmup_steps: int = 50
    """Steps of pure SFT before the controller starts; H* is measured over the first controller steps."""
    meta_interval: int = 20
    """Compute the meta-gradient every this many steps after warm-up."""
    entropy_sign: int = 1
    """+1: entropy below target raises mu (the paper's equation); -1: the paper's prose."""
    entropy_source: str = "rollouts"
    """What H and H* are measured on, always at the sampling temperature: ``rollouts`` (the mean token
    entropy of the step's own rollouts) or ``expert`` (a fixed probe of ``entropy_probe_size`` expert
    dialogues, scored without gradient every step)."""
    target_entropy_steps: int = 5
    """H* is the mean H of this many first controller steps (the entropy term is 0 until then), so one
    batch's noise does not offset the term for the whole run."""
    entropy_probe_size: int = 16
    """Expert dialogues in the fixed entropy probe (``entropy_source: expert``)."""
    lookahead: str = "adam"
    """How theta' = the next parameters depend on mu: ``adam`` (the exact derivative of the real
    clipped AdamW step) or ``sgd`` (Eq. 6 as written: d theta'/d mu = -lr (g_SFT - g_RL))."""
    meta_signal: str = "standardized"
    """``standardized``: dU/dmu divided by its standard error over the validation start states (a
    t-statistic, scale-free), clipped to +-meta_clip; ``raw``: dU/dmu itself (Eq. 6's value). With few
    states the t-statistic is heavy-tailed (with 2, about 1 pure-noise estimate in 5 reaches +-3): use 6 or more."""
    meta_clip: float = 3.0
    """Largest absolute standardized meta signal."""
    validation_states: int = 8
    """Validation start states (from the ``val`` split) per meta-gradient estimate; the same states every time."""
    validation_samples: int = 4
    """Episodes sampled per validation start state (>= 2: each gets the leave-one-out mean of the others as baseline)."""
    meta_credit: str = "turn"
    """What weighs each validation answer's log-prob in grad U (REINFORCE, leave-one-out baseline): ``turn``
    (the reward to go from that answer) or ``episode`` (the episode's whole return, as Eq. 6 is usually
    read). Both estimate the same gradient, since an answer cannot change the rewards before it; on
    GeneralPoints' 6-answer episodes ``turn`` has 5-10x less noise (BENCHMARKS.md, "meta-signal"), and on
    one-answer tasks the two are the same."""
    meta_pool_decay: float = 0.0
    """Pool the evidence over meta steps: the per-state values of dU/dmu (per unit learning rate, so steps at
    different points of the schedule share one scale) enter an exponential moving average of mean and second
    moment with this decay, and the signal is the pooled t-statistic (`amft_vlm.learning.controller.MetaPool`). 0: each
    meta step acts on its own estimate alone (Eq. 8 as written); 0.8 keeps ~5 meta steps of evidence."""

    def validate(self) -> ControllerConfig:
        """Raise ValueError naming the first bad field; return self when valid."""
        for name in ("mu_init", "mu_min", "mu_max", "eta_mu", "eta_h", "meta_clip", "meta_pool_decay"):
            _finite(f"controller.{name}", getattr(self, name))
        if not 0.0 <= self.mu_min <= self.mu_init <= self.mu_max <= 1.0:
            raise ValueError(f"controller: need 0 <= mu_min <= mu_init <= mu_max <= 1; got {self.mu_min}, {self.mu_init}, {self.mu_max}")
        for name in ("eta_mu", "eta_h"):
            if getattr(self, name) < 0:
                raise ValueError(f"controller.{name} must be >= 0 (the sign of the entropy term is entropy_sign); got {getattr(self, name)}")
        if self.entropy_sign not in (1, -1):
            raise ValueError(f"controller.entropy_sign must be 1 or -1; got {self.entropy_sign!r}")
        _choice("controller.entropy_source", self.entropy_source, ENTROPY_SOURCES)
        _choice("controller.lookahead", self.lookahead, LOOKAHEADS)
        _choice("controller.meta_signal", self.meta_signal, META_SIGNALS)
        _choice("controller.meta_credit", self.meta_credit, META_CREDITS)
        if not 0.0 <= self.meta_pool_decay < 1.0:
            raise ValueError(f"controller.meta_pool_decay must be in [0, 1) (0: no pooling); got {self.meta_pool_decay!r}")
        if not self.meta_clip > 0:
            raise ValueError(f"controller.meta_clip must be > 0; got {self.meta_clip}")
        for name in ("meta_interval", "entropy_probe_size", "validation_states", "target_entropy_steps"):
            _positive(f"controller.{name}", getattr(self, name))
        _integer_at_least("controller.warmup_steps", self.warmup_steps, 0)
        _integer_at_least(
            "controller.validation_samples", self.validation_samples, 2,
            why="each episode's baseline is the mean of the others from its start state",
        )  # fmt: skip
        if self.meta_signal == "standardized" and self.validation_states < 2:
            raise ValueError("controller.validation_states must be >= 2 with meta_signal: standardized (its standard error needs two start states)")
        return self


class MethodSettings:
    """A section of settings that one training method reads (TRL keeps one config per trainer; here each method with
    settings of its own has a section). Its key in the config is the `TrainConfig` field that holds it, and the
    methods table names the section its row reads (`amft_vlm.learning.methods.Method.settings`): a section changed from its
    defaults under another method is refused when the method is resolved (`amft_vlm.learning.resolve.resolve_method`)."""

    def validate(self, config: TrainConfig, key: str) -> None:
        """Raise ValueError naming ``key.field`` and what it accepts; `config` is the whole run (for settings that
        depend on another one)."""


@dataclass
class SftThenRlSettings(MethodSettings):
    """sft-then-rl: SFT first, then RL."""

    switch: float = 0.5
    """Fraction of the steps spent on SFT before switching to RL."""

    def validate(self, config: TrainConfig, key: str) -> None:
        """`switch` is a fraction in [0, 1]."""
        _finite(f"{key}.switch", self.switch)
        _fraction(f"{key}.switch", self.switch)


@dataclass
class ChordPhiSettings(MethodSettings):
    """chord-phi: the mix with each expert token weighted by sg(p(1-p))."""

    mu: str = "fixed"
    """``fixed`` (mu = fixed_mu; CHORD-phi reports 0.1) or ``scheduled`` (scheduled-mix's cosine)."""

    def validate(self, config: TrainConfig, key: str) -> None:
        """`mu` is fixed or scheduled."""
        _choice(f"{key}.mu", self.mu, ("fixed", "scheduled"))


@dataclass
class LuffySettings(MethodSettings):
    """luffy: an expert trajectory in each rollout group, policy shaping on its tokens."""

    shaping_gamma: float = 0.1
    """gamma of the policy shaping f(p) = p / (p + gamma) on the expert's tokens (LUFFY's 0.1)."""
    normaliser: str = "max_length"
    """What its policy-gradient token sum is divided by: ``max_length`` or ``dr_grpo``. ``max_length`` (the authors' code,
    ``loss_remove_token_mean``): max_new_tokens, a constant, not also the number of answers; ``dr_grpo``: answers
    x max_new_tokens (Dr.GRPO's). ``docs/peers.md`` lists where each peer's code and paper differ."""
    entropy_coef: float = 0.001
    """Weight of the entropy bonus ``- coef x token-mean entropy`` over all its tokens, the expert's included
    (the authors' code: ``entropy_coeff: 0.001``); 0: none."""

    def validate(self, config: TrainConfig, key: str) -> None:
        """The normaliser a known form, gamma > 0, the entropy weight >= 0."""
        _choice(f"{key}.normaliser", self.normaliser, ("max_length", "dr_grpo"))
        _finite(f"{key}.shaping_gamma", self.shaping_gamma)
        if not self.shaping_gamma > 0:
            raise ValueError(f"{key}.shaping_gamma must be > 0; got {self.shaping_gamma!r}")
        _entropy_coef(f"{key}.entropy_coef", self.entropy_coef)


@dataclass
class SrftSettings(MethodSettings):
    """srft: entropy-weighted SFT and off-policy RL on the demonstration in each group, self-RL on the rollouts."""

    sft_entropy_sign: int = 1
    """The sign in its demonstration SFT weight ``w_SFT = 0.5 exp(sign x H)``: +1 the authors' code
    (``entropy.exp()`` with ``sft_loss_coef: -0.5``), -1 the paper's Eq. 8 (SFT weighs less while H is high)."""
    entropy: str = "token"
    """The H its weights read: ``token`` or ``rollouts``. ``token`` (the code, as far as it is known): each token's own entropy, so a
    demonstration token's w_SFT reads the policy's entropy at that demonstration token and a positive sample's w_RL
    its own; ``rollouts``: one H per step, the policy's mean token entropy on its own rollouts (the paper's
    H(pi_theta), read as one number)."""
    shaping_gamma: float | None = 0.1
    """LUFFY's policy shaping p / (p + gamma) in the demonstrations' off-policy term (the code's
    ``off_policy_reshape: p_div_p_0.1``); null: the plain ratio p / 1 (the paper's Eq. 9-10)."""
    self_rl: str = "advantage"
    """Its self-RL term on the policy's own samples: ``advantage`` or ``sign``. ``advantage`` (the code): the policy gradient -A x ratio
    (PPO-clipped at clip_epsilon) on every own token, times 0.1 exp(H) on positive-advantage tokens, one token mean
    with the demonstrations' policy-gradient term; ``sign`` (the paper's Eq. 12): 0.1 exp(H) x the mean NLL of the
    positive samples + the mean log-likelihood of the negative ones."""
    entropy_coef: float = 0.001
    """Weight of the entropy bonus ``- coef x token-mean entropy`` (the authors' code: 0.001; the paper: none, 0)."""

    def validate(self, config: TrainConfig, key: str) -> None:
        """Each form a known one, gamma > 0 or null, the entropy weight >= 0."""
        _choice(f"{key}.sft_entropy_sign", self.sft_entropy_sign, (1, -1))
        _choice(f"{key}.entropy", self.entropy, ("token", "rollouts"))
        _choice(f"{key}.self_rl", self.self_rl, ("advantage", "sign"))
        if self.shaping_gamma is not None:
            _finite(f"{key}.shaping_gamma", self.shaping_gamma)
            if not self.shaping_gamma > 0:
                raise ValueError(f"{key}.shaping_gamma must be > 0, or null for the plain ratio p (the paper's); got {self.shaping_gamma!r}")
        _entropy_coef(f"{key}.entropy_coef", self.entropy_coef)


@dataclass
class ReliftSettings(MethodSettings):
    """relift: GRPO steps, with all-failed start states' expert trajectories buffered for interleaved SFT updates."""

    buffer_ratio: float = 1.0
    """The buffer's size in start states per step: one SFT update whenever it holds ``buffer_ratio x
    episodes_per_step`` expert trajectories of all-failed start states (a whole number >= 1). 1.0 is the authors'
    (ReLIFT's released scripts: a buffer of 128 for 128 prompts per step, so one SFT update about once per RL step
    while most prompts fail)."""
    rl_loss: str = "released"
    """The form of its RL steps: ``released`` or ``paper``. ``released`` (the authors' code): mean-centred group advantages (no std), the
    unclipped ratio ``-A * ratio``, the token sum divided by max_new_tokens (``loss_remove_token_mean``, as LUFFY's
    ``max_length``), and the entropy bonus ``entropy_coef``; needs ``credit: episode``. ``paper``: GRPO as the paper
    writes it, the run's group advantages (with std) and PPO-clip, token mean, no entropy bonus."""
    sft_lr_ratio: float = 1.0
    """Learning rate of the SFT updates over the RL steps' (the schedule's current rate), applied to their own AdamW
    (own moments, the run's weight decay). 1.0 is the authors' (1e-6 for both)."""
    sft_max_grad_norm: float = 1.0
    """Gradient-norm clip of the SFT updates (the authors' ``sft_grad_clip``: 1.0); 0 disables."""
    entropy_coef: float = 0.001
    """Weight of the entropy bonus ``- coef x token-mean entropy`` in the SFT updates and, in the released form, the
    RL steps (the authors' ``sft.entropy_coeff`` and ``entropy_coeff``: 0.001 each)."""

    def buffer_capacity(self, episodes_per_step: int) -> int:
        """Start states the buffer holds when it makes its SFT update: ``buffer_ratio x episodes_per_step``."""
        return round(self.buffer_ratio * episodes_per_step)

    def validate(self, config: TrainConfig, key: str) -> None:
        """The buffer a whole number of start states, the forms known ones, the step sizes positive."""
        _choice(f"{key}.rl_loss", self.rl_loss, ("released", "paper"))
        capacity = self.buffer_ratio * config.episodes_per_step
        if not (math.isfinite(capacity) and capacity >= 1 and math.isclose(capacity, round(capacity), abs_tol=1e-9)):
            raise ValueError(
                f"{key}.buffer_ratio is ReLIFT's buffer in start states per step: {key}.buffer_ratio x episodes_per_step "
                f"must be a whole number of start states, at least 1; got {self.buffer_ratio!r} x {config.episodes_per_step} "
                f"= {capacity:g}. The authors' ratio is 1.0 (a buffer of one step's start states)"
            )
        for name in ("sft_lr_ratio", "sft_max_grad_norm", "entropy_coef"):
            _finite(f"{key}.{name}", getattr(self, name))
        if not self.sft_lr_ratio > 0:
            raise ValueError(f"{key}.sft_lr_ratio must be > 0 (the SFT updates' learning rate over the RL steps'); got {self.sft_lr_ratio!r}")
        for name in ("sft_max_grad_norm", "entropy_coef"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{key}.{name} must be >= 0; got {getattr(self, name)!r}")


@dataclass
class TrainConfig:

    """Everything a training run needs; defaults run AMFT on GeneralPoints language with a tiny model on CPU."""

    method: str = "amft"
    """The training method, a row of the methods table (`amft_vlm.learning.methods.METHODS`); ``amft-vlm train --help`` and
    ``docs/settings.md`` list every one with its description, generated from the table."""
    model: str = "tiny:qwen2-vl"
    """Hugging Face model id or local path; 'tiny:qwen2-vl' / 'tiny:qwen2.5-vl' builds a tiny random model in the run directory."""
    dtype: str = "float32"
    """Storage dtype of the weights (and so of AdamW's updates and state): float32 or bfloat16 (float16 is
    refused: it needs loss scaling). Train in float32 with ``mixed_precision: bf16`` (float32 master weights,
    bfloat16 compute); bfloat16 weights suit a frozen LoRA base, and full fine-tuning in them is refused at
    any learning rate below bfloat16's epsilon (7.8e-3), where the norm gains' updates round away.
    ``float64`` is for exactness checks, not speed: runs that should agree (one process and two, a resumed
    run and a straight one) then differ by ~1e-9, too little to move a sampled token, where float32's
    rounding can (the distributed tests use it)."""
    device: str = "auto"
    """'auto' (accelerate decides), 'cpu' or 'cuda' (refused when torch sees no CUDA device)."""
    attn_implementation: str = "sdpa"
    """Attention kernel passed to from_pretrained: sdpa, eager or flash_attention_2."""
    min_pixels: int | None = None
    """Smallest image area in pixels after resizing (image token budget); None keeps the processor's."""
    max_pixels: int | None = None
    """Largest image area in pixels after resizing; None keeps the processor's."""
    freeze_vision_tower: bool = False
    """Train only the language model (the vision encoder's weights stay fixed)."""
    lora_rank: int = 0
    """LoRA rank through peft (0 = full fine-tuning; needs peft: ``pip install 'amft-vlm[lora]'``).
    Adapters go on the language model's attention and MLP projections (`amft_vlm.learning.lora`); checkpoints
    then hold the adapters (``lora/``) and name the base model."""
    lora_alpha: float | None = None
    """LoRA alpha; None gives 2 x lora_rank (a scale of 2)."""
    lora_dropout: float = 0.0
    """Dropout on the LoRA input. It acts in the loss passes (the model trains in training mode) and never
    in rollouts, validation or evaluation; so with dropout > 0 the PPO ratio and the rollout entropy
    the controller reads carry dropout noise, as in any policy-gradient trainer with dropout."""

    env_id: str = "GeneralPoints-v0"
    """Environment to train on."""
    env_kwargs: dict[str, Any] = field(default_factory=lambda: {"modality": "language", "split": "train"})
    """gym.make keywords of the training environment."""
    validation_env_kwargs: dict[str, Any] = field(default_factory=lambda: {"modality": "language", "split": "val"})
    """gym.make keywords of the validation episodes for the meta-gradient's utility U: the ``val`` split,
    disjoint from ``train`` and from ``test`` (which held-out evaluation reports), so the controller never
    sees the hands or routes the reported numbers come from."""
    expert_data: str | None = None
    """Expert dataset directory (amft-vlm collect, or amft-vlm export's Parquet); None collects expert_episodes with the oracle expert."""
    expert_data_after_warmup: str | None = None
    """A second expert dataset that replaces ``expert_data`` once the controller's warm-up ends (amft and its
    ablations with a warm-up): a controlled test of the controller, e.g. a run that shares another run's clean
    warm-up (``warm_start``) and then imitates a poisoned expert (`amft_vlm.rollout.expert_data.corrupt_dataset`; the
    demo's corrupted-expert run). It must be recorded in the run's environment like ``expert_data``. None:
    ``expert_data`` throughout."""
    expert_episodes: int = 512
    """Expert episodes to collect when expert_data is None."""
    image_cache_mb: int = 4096
    """Host memory (MB per process) the expert set may keep its images prepared for the vision tower in, so
    scoring never prepares them again. A larger set keeps only its uint8 images and prepares a batch's
    images once per draw instead (logged). Prepared inputs are float32: at the default Qwen pixel bounds
    about 35 MB for a 1200 px GeneralPoints table, against 4.3 MB as uint8."""

    steps: int = 500
    """Training iterations in all (every method gets the same). Each collects one batch (expert
    dialogues and/or rollouts) and makes ``ppo_epochs`` x mini-batches optimiser updates on it."""
    episodes_per_step: int = 8
    """RL start states per step; each is played group_size times."""
    group_size: int = 8
    """Rollouts per start state (GRPO group)."""
    sft_batch_size: int = 32
    """Expert dialogues per step for L_SFT."""
    num_envs: int = 16
    """Environments the rollout engine runs together."""
    max_new_tokens: int = 96
    """Longest response per turn."""
    temperature: float = 1.0
    """Sampling temperature of RL rollouts."""

    learning_rate: float = 1e-6
    """Peak learning rate of AdamW."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    lr_schedule: str = "cosine"
    """'cosine' (decays to 0 exactly at `steps`) or 'constant', after lr_warmup_steps of linear warm-up."""
    lr_warmup_steps: int = 0
    """Linear learning-rate warm-up steps."""
    max_grad_norm: float = 1.0
    """Gradient clipping norm (0 disables)."""
    gradient_accumulation_steps: int = 1
    """Micro-batches per optimiser step (per process)."""
    gradient_checkpointing: bool = False
    """Recompute each decoder layer's activations in the backward pass instead of keeping them (less memory,
    about a third more compute in the loss passes); rollouts are unaffected."""
    distributed: str = "auto"
    """How several processes share the work (`amft_vlm.learning.distributed`): ``ddp`` (each holds the whole model;
    gradients summed in backward), ``fsdp2`` (parameters, gradients and AdamW state sharded), ``none`` (one
    process) or ``auto`` (one process: none; several: fsdp2 when accelerate is configured for FSDP, else ddp)."""
    mixed_precision: str = "no"
    """Compute dtype of every forward pass: ``no`` (the weights' dtype) or ``bf16`` (``torch.autocast`` in
    bfloat16 over the stored weights; the updates, AdamW state and gradient reductions stay in the weights'
    dtype). ``fp16`` is refused: it needs loss scaling, which the separate g_SFT / g_RL passes do not do.
    (``no`` in YAML is the string, not false.)"""

    advantage: str = "grpo"
    """'grpo' (group-normalised, no critic) or 'ppo' (value head and GAE)."""
    credit: str = "episode"
    """'episode': every turn gets the episode return; 'turn': each turn its own reward (plus GAE for ppo)."""
    clip_epsilon: float = 0.2
    """PPO clip range of the probability ratio (and of the ppo critic's value change)."""
    ppo_epochs: int = 1
    """Passes over each iteration's batch. 1 (with one mini-batch) is one optimiser step per batch: the
    ratio is then exactly 1 and the clip never acts; Chu et al.'s recipe uses 4. Every method makes the
    same number of updates per iteration (an SFT-only iteration passes over its expert batch as often)."""
    mini_batch_size: int | None = None
    """Rollouts per optimiser update; the expert batch is split into as many parts. None: the whole batch
    in one update. Updates per iteration = ppo_epochs x ceil(episodes_per_step x group_size / mini_batch_size)."""
    gamma: float = 1.0
    """Discount per turn in GAE (ppo)."""
    gae_lambda: float = 0.95
    """GAE lambda over turns (ppo)."""
    value_learning_rate: float = 1e-3
    """AdamW learning rate of the ppo critic, a linear value head on the policy's detached hidden states
    (`amft_vlm.learning.critic`); it has its own optimiser, so the value loss never moves the policy."""

    fixed_mu: float = 0.5
    """mu of the fixed-mix baseline."""
    schedule_mu_start: float = 0.9
    """scheduled-mix (CHORD-mu; and chord-phi with ``chord_phi.mu: scheduled``): mu when the cosine decay starts
    (CHORD's ``mu_peak``; 0.9 for CHORD-mu)."""
    schedule_mu_end: float = 0.05
    """scheduled-mix: mu at the end of the decay and after it (CHORD's ``mu_valley``; 0.05 for CHORD-mu)."""
    schedule_steps: int | None = 200
    """scheduled-mix: steps of the cosine decay, after the warm-up (CHORD's ``mu_decay_steps``; 200 for CHORD-mu,
    whose mu then stays at schedule_mu_end); None: every step left after the warm-up."""
    schedule_warmup_steps: int = 0
    """scheduled-mix: steps over which mu first rises linearly from 0 to schedule_mu_start (CHORD's
    ``mu_warmup_steps``; 0 for CHORD-mu and CHORD-phi)."""
    sft_then_rl: SftThenRlSettings = field(default_factory=SftThenRlSettings)
    """sft-then-rl's settings (`SftThenRlSettings`)."""
    chord_phi: ChordPhiSettings = field(default_factory=ChordPhiSettings)
    """chord-phi's settings (`ChordPhiSettings`)."""
    luffy: LuffySettings = field(default_factory=LuffySettings)
    """luffy's settings (`LuffySettings`)."""
    srft: SrftSettings = field(default_factory=SrftSettings)
    """srft's settings (`SrftSettings`)."""
    relift: ReliftSettings = field(default_factory=ReliftSettings)
    """relift's settings (`ReliftSettings`)."""
    controller: ControllerConfig = field(default_factory=ControllerConfig)
    """The AMFT controller (amft and its ablations)."""

    output_dir: str = "runs/amft"
    """Run directory: checkpoints, metrics.jsonl, config.yaml."""
    warm_start: str | None = None
    """A checkpoint of another run (``RUN/checkpoints/step-N``) whose first N iterations this run shares, e.g.
    an ``sft`` run's step N for an ``amft`` run with ``controller.warmup_steps >= N``: both are N iterations of
    pure SFT on the same data, so this run starts from that checkpoint as a resumed run would (weights,
    optimiser, schedule, data position, random state, budget) and copies that run's metric lines up to
    step N. Refused unless both runs are pure SFT for those N iterations and agree on every setting that
    shapes them (`WARM_START_FIELDS`). A checkpoint of this run's own directory (``--resume``) wins."""
    save_every: int = 50
    """Checkpoint every this many steps (and at the end)."""
    seed: int = 0
    """Seed of everything: model init (tiny), data order, environments, sampling."""
    report_to: list[str] = field(default_factory=list)
    """accelerate trackers besides metrics.jsonl: tensorboard, wandb (when installed)."""

    def _check_update_precision(self) -> None:
        """Refuse weights whose updates round away (bf16 full fine-tuning) or need loss scaling (float16)."""
        if self.dtype == "float16":
            raise ValueError(
                "dtype: float16 is not supported for training: float16 compute needs loss scaling against underflow, which "
                "the trainer does not do; use dtype: float32 with mixed_precision: bf16 (or dtype: bfloat16 for a LoRA base)"
            )
        if self.lora_rank or self.dtype in ("float32", "float64"):
            return
        import torch

        # Norm gains sit near 1.0, where bfloat16's spacing is its epsilon: a smaller step never moves them.
        smallest = torch.finfo(getattr(torch, self.dtype)).eps
        if self.learning_rate < smallest:
            raise ValueError(
                f"dtype: {self.dtype} keeps the weights AdamW updates in {self.dtype}, with no float32 master copy: at "
                f"learning_rate {self.learning_rate:g} an update is below the spacing of a norm gain near 1.0 ({smallest:.2g}; "
                f"of a typical 0.02 weight: {TYPICAL_WEIGHT * smallest:.2g}) and rounds away. Set dtype: float32 with "
                "mixed_precision: bf16 (float32 master weights and optimiser state, bfloat16 compute), or train LoRA "
                "adapters (lora_rank > 0; they are kept in float32)"
            )

    def method_sections(self) -> dict[str, MethodSettings]:
        """The per-method sections by key: ``{"luffy": self.luffy, ...}``."""
        return {item.name: getattr(self, item.name) for item in dataclasses.fields(self) if isinstance(getattr(self, item.name), MethodSettings)}

    def validate(self) -> TrainConfig:
        """Raise ValueError naming the first bad field and what it accepts; return self when valid.

        Checks every value on its own and each section (`MethodSettings.validate`, `ControllerConfig.validate`); what
        depends on the method's row (its name among them) is checked when the method is resolved
        (`amft_vlm.learning.resolve.resolve_method`), one floor up, where the methods table is."""
        if not isinstance(self.method, str) or not self.method:
            raise ValueError(f"method must be the name of a training method (amft-vlm train --help lists them); got {self.method!r}")
        _choice("dtype", self.dtype, ("float32", "bfloat16", "float16", "float64"))
        _choice("lr_schedule", self.lr_schedule, ("cosine", "constant"))
        _choice("mixed_precision", self.mixed_precision, ("no", "bf16", "fp16"))
        _choice("distributed", self.distributed, ("auto", "none", "ddp", "fsdp2"))
        if self.mixed_precision == "fp16":
            raise ValueError(
                "mixed_precision: fp16 is not supported: float16 compute needs loss scaling against underflow, which "
                "the trainer's separate g_SFT / g_RL passes and look-ahead do not do; use mixed_precision: bf16"
            )
        _choice("advantage", self.advantage, ("grpo", "ppo"))
        _choice("credit", self.credit, ("episode", "turn"))
        for name in ("steps", "episodes_per_step", "group_size", "sft_batch_size", "num_envs", "max_new_tokens", "gradient_accumulation_steps", "save_every", "expert_episodes", "ppo_epochs"):
            _positive(name, getattr(self, name))
        for key, section in self.method_sections().items():
            section.validate(self, key)
        if self.mini_batch_size is not None:
            _positive("mini_batch_size", self.mini_batch_size)
            parts = math.ceil(self.episodes_per_step * self.group_size / self.mini_batch_size)
            if self.sft_batch_size < parts:
                raise ValueError(
                    f"sft_batch_size ({self.sft_batch_size}) must be at least the number of mini-batches ({parts} = "
                    f"episodes_per_step x group_size / mini_batch_size, rounded up): each update takes a share of the expert batch"
                )
        for item in dataclasses.fields(self):
            value = getattr(self, item.name)
            if isinstance(value, float):
                _finite(item.name, value)
        for name in ("learning_rate", "temperature", "clip_epsilon", "value_learning_rate"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0; got {getattr(self, name)!r}")
        for name in ("fixed_mu", "schedule_mu_start", "schedule_mu_end"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1]; got {getattr(self, name)!r}")
        for name in ("gamma", "gae_lambda"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1]; got {getattr(self, name)!r}")
        if self.lora_rank < 0:
            raise ValueError(f"lora_rank must be >= 0 (0 = full fine-tuning); got {self.lora_rank}")
        _choice("device", self.device, ("auto", "cpu", "cuda"))
        if self.device == "cuda":
            check_device(self.device)
        _integer_at_least("lr_warmup_steps", self.lr_warmup_steps, 0)
        for name in ("weight_decay", "max_grad_norm"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0; got {getattr(self, name)!r}")
        for name in ("min_pixels", "max_pixels"):
            if getattr(self, name) is not None:
                _positive(name, getattr(self, name))
        if self.min_pixels is not None and self.max_pixels is not None and self.min_pixels > self.max_pixels:
            raise ValueError(f"min_pixels ({self.min_pixels}) must be <= max_pixels ({self.max_pixels})")
        _integer_at_least("image_cache_mb", self.image_cache_mb, 0, why="0 keeps no prepared expert images")
        if self.schedule_steps is not None:
            _positive("schedule_steps", self.schedule_steps)
        _integer_at_least("schedule_warmup_steps", self.schedule_warmup_steps, 0)
        if not (isinstance(self.seed, int) and 0 <= self.seed < 2**32):
            raise ValueError(f"seed must be an integer in [0, 2**32) (numpy's seed range); got {self.seed!r}")
        if self.lora_alpha is not None and not self.lora_alpha > 0:
            raise ValueError(f"lora_alpha must be > 0 or None (2 x lora_rank); got {self.lora_alpha!r}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1); got {self.lora_dropout!r}")
        self._check_update_precision()
        self.controller.validate()
        if self.expert_data is not None and not os.path.isdir(self.expert_data):
            raise ValueError(f"expert_data: {self.expert_data!r} is not a directory; run `amft-vlm collect --out DIR` (or `amft-vlm export`) or set expert_data=None")
        if self.expert_data_after_warmup is not None and not os.path.isdir(self.expert_data_after_warmup):
            raise ValueError(f"expert_data_after_warmup: {self.expert_data_after_warmup!r} is not a directory; give an expert dataset or null")
        return self


WARM_START_FIELDS = (
    "model", "dtype", "attn_implementation", "min_pixels", "max_pixels", "freeze_vision_tower", "lora_rank", "lora_alpha",
    "lora_dropout", "env_id", "env_kwargs", "expert_data", "expert_episodes", "steps", "episodes_per_step", "group_size",
    "sft_batch_size", "learning_rate", "weight_decay", "lr_schedule", "lr_warmup_steps", "max_grad_norm",
    "gradient_accumulation_steps", "mixed_precision", "ppo_epochs", "mini_batch_size", "seed",
)
"""Settings two runs must share for one to warm-start from the other's SFT iterations (`TrainConfig.warm_start`)."""


MOVED_TO_SECTIONS = {
    "sft_then_rl_switch": "sft_then_rl.switch",
    "chord_mu": "chord_phi.mu",
    "luffy_shaping_gamma": "luffy.shaping_gamma",
    "luffy_normaliser": "luffy.normaliser",
    "luffy_entropy_coef": "luffy.entropy_coef",
    "srft_sft_entropy_sign": "srft.sft_entropy_sign",
    "srft_entropy": "srft.entropy",
    "srft_shaping_gamma": "srft.shaping_gamma",
    "srft_self_rl": "srft.self_rl",
    "srft_entropy_coef": "srft.entropy_coef",
    "relift_buffer_ratio": "relift.buffer_ratio",
    "relift_rl_loss": "relift.rl_loss",
    "relift_sft_lr_ratio": "relift.sft_lr_ratio",
    "relift_sft_max_grad_norm": "relift.sft_max_grad_norm",
    "relift_entropy_coef": "relift.entropy_coef",
}
"""Flat settings of earlier versions that now live in a method's section: old key -> new dotted key."""


REPLACED_FIELDS = {
    "relift_buffer_size": "ReLIFT's buffer is sized in start states per step, relift.buffer_ratio (relift_buffer_size N "
    "is relift.buffer_ratio N / episodes_per_step; the authors' is 1.0)",
    **{
        old: f"it moved into its method's section: write {new} (in YAML, {new.split('.')[0]}: {{{new.split('.')[1]}: ...}})"
        for old, new in MOVED_TO_SECTIONS.items()
    },
}
"""Settings of earlier versions that a config may still name, and what took their place."""


TYPICAL_WEIGHT = 0.02
"""Size of a typical weight (Qwen's init std, and the scale of trained LLM weights), quoted by the precision check."""


def _finite(name: str, value: float) -> None:
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number; got {value!r}")


def _choice(name: str, value: object, allowed: tuple) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(map(str, allowed))}; got {value!r}")


def _fraction(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be in [0, 1]; got {value!r}")


def _entropy_coef(name: str, value: float) -> None:
    _finite(name, value)
    if not value >= 0:
        raise ValueError(f"{name} must be >= 0 (0: no entropy bonus); got {value!r}")


def check_device(device: str, *, what: str = "device") -> None:
    """Raise ``ValueError`` unless `device` is ``auto`` or a device this torch has (``cpu``, ``cuda``, ``cuda:1``, ...)."""
    if device == "auto":
        return
    import torch

    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError):
        raise ValueError(f"{what}: {device!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if parsed.type == "cpu":
        return
    if parsed.type != "cuda":
        raise ValueError(f"{what}: {device!r} is not supported; use auto, cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise ValueError(
            f"{what}: {device} was asked for, but this torch ({torch.__version__}) sees no CUDA device; use cpu or auto"
        )
    if parsed.index is not None and parsed.index >= torch.cuda.device_count():
        raise ValueError(
            f"{what}: {device} does not exist; this machine has {torch.cuda.device_count()} CUDA device(s)"
        )


def _positive(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer; got {value!r}")


def _integer_at_least(name: str, value: object, minimum: int, *, why: str = "") -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        reason = f" ({why})" if why else ""
        raise ValueError(f"{name} must be an integer >= {minimum}{reason}; got {value!r}")


def _coerce(name: str, value: Any, annotation: Any) -> Any:
    """Convert a YAML/override value to the field's type, or explain what was expected."""
    if isinstance(annotation, type) and dataclasses.is_dataclass(annotation):
        if not isinstance(value, dict):
            raise ValueError(f"{name} must be a mapping of its fields; got {value!r}")
        return dataclass_from_dict(annotation, value, prefix=f"{name}.")
    text = str(annotation)
    if value is None:
        if "None" in text:
            return None
        raise ValueError(f"{name} cannot be null")
    if text.startswith("bool") or annotation is bool:
        if isinstance(value, bool):
            return value
        raise ValueError(f"{name} must be true or false; got {value!r}")
    if annotation is int or text.startswith("int"):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ValueError(f"{name} must be an integer; got {value!r}")
    if annotation is float or text.startswith("float"):
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        raise ValueError(f"{name} must be a number; got {value!r}")
    if text.startswith("dict"):
        if isinstance(value, dict):
            return dict(value)
        raise ValueError(f"{name} must be a mapping; got {value!r}")
    if text.startswith("list"):
        if isinstance(value, list):
            return list(value)
        raise ValueError(f"{name} must be a list; got {value!r}")
    if isinstance(value, str):
        return value
    raise ValueError(f"{name} must be a string; got {value!r}")


def dataclass_from_dict(cls: type, values: dict[str, Any], *, prefix: str = "") -> Any:
    """An instance of dataclass `cls` from plain data: each value converted to its field's type (nested
    dataclasses from mappings), fields left out keep their defaults; errors name the field as ``PREFIXfield``."""
    hints = get_type_hints(cls)
    fields = {item.name: item for item in dataclasses.fields(cls)}
    unknown = [key for key in values if key not in fields]
    if unknown:
        replaced = REPLACED_FIELDS.get(f"{prefix}{unknown[0]}")
        if replaced is not None:
            raise ValueError(f"config field '{prefix}{unknown[0]}' was replaced: {replaced}")
        raise ValueError(f"unknown config field '{prefix}{unknown[0]}'; known fields: {', '.join(sorted(fields))}")
    missing = [
        name for name, item in fields.items()
        if name not in values and item.default is dataclasses.MISSING and item.default_factory is dataclasses.MISSING
    ]  # fmt: skip
    if missing:
        raise ValueError(f"config field '{prefix}{missing[0]}' is missing; it has no default")
    return cls(**{key: _coerce(prefix + key, value, hints[key]) for key, value in values.items()})


def _set_dotted(values: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = values
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ValueError(f"override {dotted!r}: {part!r} is not a section")
    node[leaf] = value


MAX_YAML_LENGTH = 2**20
"""Longest YAML text read, in characters (a file: in bytes). A config is a few kilobytes."""

MAX_YAML_VALUES = 100_000
"""Most values (scalars, lists and mappings) a YAML document may stand for with its aliases expanded. An
alias (``*name``) repeats the value its anchor (``&name``) names, and aliases of aliases multiply: a few
hundred bytes can stand for billions of values (a "billion laughs" document). PyYAML builds them shared,
but every later walk over the config (validation, comparison, copying, writing ``config.yaml``) expands
them, so such a document is refused before its values are built. A config stands for a few hundred."""

MAX_YAML_DEPTH = 64
"""Deepest nesting of lists and mappings read, in brackets or by indentation (counted apart). PyYAML's scanner
takes time quadratic in the bracket depth, so a megabyte of ``[`` would never finish; a config nests a few levels."""


class YamlLimitError(yaml.MarkedYAMLError):
    """A YAML document refused before its values are built: longer than `MAX_YAML_LENGTH`, nested deeper than
    `MAX_YAML_DEPTH`, standing for more than `MAX_YAML_VALUES` values once its aliases are expanded, or with an
    alias inside the value it names. ``problem`` says which and what to change; ``problem_mark`` is the line,
    when known."""


class _Yaml12Loader(yaml.SafeLoader):
    """PyYAML (a YAML 1.1 parser) with the YAML 1.2 core schema's scalars, plus Python's ``None`` as null.

    Booleans are only true/false (any case): yes/no/on/off stay strings, so ``mixed_precision: no`` is 'no'.
    Numbers are decimal, 0o octal or 0x hex integers and floats with or without a dot (``1e-3``), .inf and
    .nan; ``010`` is ten, and 1.1's sexagesimal ``1:20``, ``1_000`` and dates stay strings.

    Aliases and merge keys (``<<: *defaults``) work, within `MAX_YAML_VALUES` (`_expanded_size`); nesting
    stops at `MAX_YAML_DEPTH`, as the scanner meets it.
    """

    yaml_implicit_resolvers: ClassVar[dict] = {
        first: [(tag, regexp) for tag, regexp in resolvers if tag == "tag:yaml.org,2002:merge"]
        for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
    }

    def fetch_flow_collection_start(self, TokenClass: type) -> None:  # noqa: N803 - PyYAML's name
        """PyYAML's scanner at a ``[`` or ``{``, refused beyond `MAX_YAML_DEPTH` open brackets."""
        if self.flow_level >= MAX_YAML_DEPTH:
            raise _too_deep(self.get_mark())
        super().fetch_flow_collection_start(TokenClass)

    def add_indent(self, column: int) -> bool:
        """PyYAML's scanner entering a deeper indentation, refused beyond `MAX_YAML_DEPTH` levels."""
        if self.indent < column and len(self.indents) >= MAX_YAML_DEPTH:
            raise _too_deep(self.get_mark())
        return super().add_indent(column)

    def compose_document(self) -> yaml.Node:
        """The document's node graph (aliases are shared nodes in it), checked by `_expanded_size` before any value is built."""
        node = super().compose_document()
        _expanded_size(node, {}, set())
        return node


def _too_deep(mark: yaml.Mark) -> YamlLimitError:
    """The refusal of a document nested deeper than `MAX_YAML_DEPTH`, at `mark`."""
    return YamlLimitError(problem=f"it nests lists and mappings more than {MAX_YAML_DEPTH} levels deep; a config nests a few", problem_mark=mark)


def _expanded_size(node: yaml.Node, sizes: dict[int, int], open_nodes: set[int]) -> int:
    """How many values `node` stands for with every alias expanded, each shared node counted once per use.

    `sizes` remembers the nodes already counted (so the walk is as long as the document, not as its expansion)
    and `open_nodes` those being counted (an alias to one of them is inside the value it names).

    Raises:
        YamlLimitError: at the first value (the innermost) that stands for more than `MAX_YAML_VALUES` values,
            or at a value that contains an alias to itself.
    """
    if id(node) in sizes:
        return sizes[id(node)]
    if id(node) in open_nodes:
        raise YamlLimitError(
            problem="an alias refers to a value that contains it (a recursive document); write the value out instead",
            problem_mark=node.start_mark,
        )
    open_nodes.add(id(node))
    if isinstance(node, yaml.MappingNode):
        children = [part for pair in node.value for part in pair]
    else:
        children = node.value if isinstance(node, yaml.SequenceNode) else []
    size = 1 + sum(_expanded_size(child, sizes, open_nodes) for child in children)
    open_nodes.discard(id(node))
    if size > MAX_YAML_VALUES:
        raise YamlLimitError(
            problem=(
                f"this value stands for {size:,} values once its aliases are expanded, more than the {MAX_YAML_VALUES:,} "
                "a config may hold (aliases of aliases multiply: a 'billion laughs' document); write the values out, "
                "or use fewer aliases"
            ),
            problem_mark=node.start_mark,
        )
    sizes[id(node)] = size
    return size


for _tag, _pattern, _first in (
    ("tag:yaml.org,2002:null", r"~|null|Null|NULL|None|", ["~", "n", "N", ""]),
    ("tag:yaml.org,2002:bool", r"true|True|TRUE|false|False|FALSE", list("tTfF")),
    ("tag:yaml.org,2002:int", r"[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+", list("-+0123456789")),
    (
        "tag:yaml.org,2002:float",
        r"[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN)",
        list("-+.0123456789"),
    ),
):
    _Yaml12Loader.add_implicit_resolver(_tag, re.compile(f"^(?:{_pattern})$"), _first)


def _yaml12_int(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> int:
    text = loader.construct_scalar(node)
    if text.startswith(("0o", "0x")):
        return int(text[2:], 8 if text[1] == "o" else 16)
    return int(text, 10)  # "010" is ten, not YAML 1.1's octal eight


_Yaml12Loader.add_constructor("tag:yaml.org,2002:int", _yaml12_int)


def parse_yaml(text: str) -> Any:
    """A config file or one ``key=value`` value, read with YAML 1.2 scalars (see `_Yaml12Loader`).

    The one YAML reader of amft-vlm (files through `read_yaml_file`). Its input is bounded: a text longer than
    `MAX_YAML_LENGTH`, nested deeper than `MAX_YAML_DEPTH`, standing for more than `MAX_YAML_VALUES` values once
    its aliases are expanded, or holding an alias inside the value it names, raises `YamlLimitError` (a
    ``yaml.YAMLError``) before any value is built.
    """
    if len(text) > MAX_YAML_LENGTH:
        raise YamlLimitError(problem=f"it is {len(text):,} characters long, more than {MAX_YAML_LENGTH:,}; a config is a few kilobytes")
    try:
        return yaml.load(text, Loader=_Yaml12Loader)
    except RecursionError:  # PyYAML composes recursively: a backstop under MAX_YAML_DEPTH, when the caller's stack is deep
        raise YamlLimitError(problem="it is nested too deeply to read; a config nests a few levels") from None


def parse_key_value(pair: str, *, what: str = "overrides", example: str = "steps=100") -> tuple[str, Any]:
    """``"key=value"`` -> ``(key, value)``, the value read as YAML 1.2 (`parse_yaml`), the one parser of every command.

    ``x=0.5`` -> 0.5, ``x=3`` -> 3, ``x=true`` -> True, ``x=null`` or ``x=None`` -> None, ``x=abc`` -> 'abc',
    ``x={a: 1}`` -> a dict, ``x=`` -> ''. Quote a value to keep it a string (``x="'0.5'"`` in a shell).
    `what` and `example` name the option in the error for anything else (no ``=``, no key, not YAML).
    """
    key, sep, raw = pair.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ValueError(f"{what} must be key=value, like {example}; got {pair!r}")
    if not raw:
        return key, ""
    try:
        return key, parse_yaml(raw)
    except YamlLimitError as error:
        raise ValueError(f"{what}: the value of {key!r} is refused ({error.problem})") from None
    except yaml.YAMLError as error:
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise ValueError(f"{what}: the value of {pair!r} is not a YAML value ({problem}); quote it to pass it as a string") from None


def load_values(path: str | os.PathLike | None = None, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """A YAML config file (or nothing) as plain data, with ``key=value`` overrides applied (dotted keys reach sections)."""
    values: dict[str, Any] = {}
    if path is not None:
        loaded = _read_config_file(path) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"{path}: a config file is a mapping of field: value; got {type(loaded).__name__}")
        values = loaded
    for override in overrides:
        _set_dotted(values, *parse_key_value(override, example="steps=100 or controller.eta_mu=0.1"))
    return values


def _read_config_file(path: str | os.PathLike) -> Any:
    """A ``--config`` file's contents (`read_yaml_file`); a missing file or a directory is a ``ValueError`` saying what --config takes."""
    source = Path(path)
    if source.is_dir():
        raise ValueError(f"{source} is a directory; --config takes a YAML file such as configs/gp-l.yaml")
    if not source.exists():
        raise ValueError(f"{source} not found; --config takes a YAML file such as configs/gp-l.yaml")
    return read_yaml_file(source)


def read_yaml_file(path: str | os.PathLike) -> Any:
    """A YAML file's contents read by `parse_yaml`, within its limits: the one reader of every YAML file amft-vlm
    reads (``--config`` files, a run's ``config.yaml``). Only a regular file is read, and no more than
    `MAX_YAML_LENGTH` bytes of it (`amft_vlm.run.safe_io.read_regular_bytes`).

    Raises:
        ValueError: naming the file (and line) when it cannot be read, is not a regular file (a FIFO, a device:
            `amft_vlm.run.safe_io.InputFileError`), is longer than `MAX_YAML_LENGTH` bytes, is not valid YAML, or is
            refused by `parse_yaml`'s limits.
    """
    source = Path(path)
    try:  # a FIFO or device is refused, not waited on
        text = read_regular_bytes(source, MAX_YAML_LENGTH, what="a config").decode()
    except InputFileError:
        raise
    except (OSError, UnicodeDecodeError) as error:
        raise ValueError(f"{source} cannot be read ({error})") from None
    try:
        return parse_yaml(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f", line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        verdict = "refused" if isinstance(error, YamlLimitError) else "not valid YAML"
        raise ValueError(f"{source}{where}: {verdict} ({problem})") from None


def load_config(path: str | os.PathLike | None = None, overrides: Sequence[str] = ()) -> TrainConfig:
    """Read a YAML config (or the defaults), apply ``key=value`` overrides (YAML-typed values) and validate."""
    return dataclass_from_dict(TrainConfig, load_values(path, overrides)).validate()


def config_to_dict(config: TrainConfig) -> dict[str, Any]:
    """The config as plain data (for config.yaml in the run directory and the trackers)."""
    return dataclasses.asdict(config)
