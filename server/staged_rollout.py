"""Staged rollouts: a release goes to a canary cohort first, and to the rest only on evidence.

``edgefl server rollout MODEL VERSION`` (:mod:`edgefl.server.cli_rollout`) runs one
:class:`StagedRollout` in the foreground, recording every step in the registry (tables
``rollouts`` and ``rollout_devices``):

1. **Checks, before anything is published.** The options; the release (a *published*
   release and variant whose files match the registry, as ``server deploy`` requires:
   :func:`~edgefl.server.rollout.published_variants`,
   :func:`~edgefl.server.rollout.desired_state`); the targets (admitted devices, of
   ``--fleet`` and/or ``--devices``); the signing key; that at least one target is online;
   that each canary's previous model is a published release it can be rolled back to;
   and that no other running rollout holds one of the targets. A failed check is a
   :class:`~edgefl.errors.BadInputError` (or :class:`~edgefl.errors.ConfigError`) and
   nothing is published or recorded.
2. **Canaries.** ``ceil(--canary × online targets)`` devices, at least one, chosen among
   the *online* targets by the sorted hash of rollout id and device id (so a rollout's
   cohort is reproducible, and different rollouts spread over the fleet). Each gets its
   own signed desired state (``device`` = its id, not ``"*"``), retained on its
   ``state/desired`` topic.
3. **Watch.** The controller reads what the ingest stored: each canary's reported model
   state (``device_states``, from its own retained ``state/reported``), its presence
   (``devices.online``) and its newest inference report (``telemetry/inference``: per
   model version, evaluation samples answered, correct, errors; cumulative since the
   agent started). A canary *fails* when it reports the release ``rolled_back`` or
   refused (``failed`` with any reason but ``download_failed``, which the device
   retries), reports inference errors with it, or does not report it running within
   ``--install-timeout``. More failures than ``--max-failures`` × cohort halts at once.
4. **Soak.** Once every canary has settled, ``--soak`` seconds more of watching (a
   device's health window may still roll the release back). Then, with
   ``--min-accuracy`` or ``--max-accuracy-drop``, each installed canary's accuracy
   with the release on evaluation samples (a held-out split the agent never trains on)
   is judged on the device itself: below the floor, more points below the previous
   version's accuracy on the same device, or fewer than ``--min-evaluated`` samples
   answered by the deadline, and the canary fails.
5. **Pass.** The rest get their signed desired states (online or not: retained, so an
   offline device gets it when it reconnects and never blocks the rollout, marked
   ``offline``). The rollout waits for the online ones to report, then is
   ``completed`` (or ``failed`` when more than ``--max-failures`` of them failed; the
   controller does not roll the rest back by itself: ``server deploy --rollback`` does).
6. **Halt.** Each canary gets a signed rollback (``rollback=true``) to the version it ran
   before; the controller waits for it to report that version again (``restored``) and
   marks the rollout ``halted`` with the reason. The rest were never sent the release.

Every judgement is per device, from that device's own topics: the broker's ACL lets a
device write only its own subtree, and the ingest refuses a report or record whose body
names another device. A device that lies about itself (reports the release running, or a
perfect accuracy over a million samples) changes its own row only; it cannot hide
another canary's failure, and accuracy is never pooled across devices for a decision.

**Shadow** (``--shadow``). Before step 2, the canaries first run the release *beside*
their current model without serving its answers: each gets a signed desired state naming
the model it runs now and the release as its ``shadow``
(:class:`~edgefl.proto.desired.DesiredState`); its agent checks the shadow like any
release, keeps it outside its A/B slots, runs it on the same samples after answering them
and reports, per shadow version, its agreement with the served answers and, on evaluation
samples, its accuracy beside the served answers' accuracy on the very same samples
(``telemetry/inference``, ``shadow``). A canary fails the shadow stage when its agent
refuses the shadow (or the desired state: an agent that predates shadows refuses it as
malformed, and its reports have no ``shadow`` section), reports shadow errors, does not
run it within ``--install-timeout``, answers fewer than ``--min-evaluated`` samples with
it by ``--install-timeout`` after the soak, or misses a threshold: ``--min-agreement``
(agreement with the served answers), ``--min-accuracy`` (the shadow's own accuracy),
``--max-accuracy-drop`` (points below the served answers on the same samples). Too many
failures and the rollout **halts with no answer ever changed**: the canaries get a state
without the shadow (it is removed) and the rest get nothing. Otherwise it goes on with
step 2, which also removes the shadow (the release's state carries none). The canaries'
rows say ``shadow`` during that stage; the evidence (per canary: compared, agreement,
accuracy and served accuracy, errors, skipped) is kept in the rollout's evidence.

SIGINT or SIGTERM (the ``stop`` event) stops the watching and leaves the devices as they
are: the rollout is marked ``interrupted`` with what was published.

The code is in :mod:`edgefl.server.rollouts` (options, plan, verdicts, watch, records,
controller); this module names its public parts, and the internals the security tests
feed with forged reports.
"""

from __future__ import annotations

from edgefl.server.rollouts.controller import RolloutProgress, StagedRollout
from edgefl.server.rollouts.options import (
    DEFAULT_CANARY,
    DEFAULT_INSTALL_TIMEOUT_S,
    DEFAULT_MAX_FAILURES,
    DEFAULT_MIN_EVALUATED,
    DEFAULT_SOAK_S,
    INFERENCE_STREAM,
    RolloutOptions,
    parse_duration,
    parse_share,
)
from edgefl.server.rollouts.plan import ModelRef
from edgefl.server.rollouts.plan import _shadow_figures as _shadow_figures
from edgefl.server.rollouts.plan import _Target as _Target
from edgefl.server.rollouts.records import list_rollouts, read_rollout, results_by_version
from edgefl.server.rollouts.verdicts import _shadow_failure as _shadow_failure
from edgefl.server.rollouts.verdicts import _shadow_refusal as _shadow_refusal
from edgefl.server.rollouts.verdicts import choose_canaries, classify

__all__ = [
    "DEFAULT_CANARY",
    "DEFAULT_INSTALL_TIMEOUT_S",
    "DEFAULT_MAX_FAILURES",
    "DEFAULT_MIN_EVALUATED",
    "DEFAULT_SOAK_S",
    "INFERENCE_STREAM",
    "ModelRef",
    "RolloutOptions",
    "RolloutProgress",
    "StagedRollout",
    "choose_canaries",
    "classify",
    "list_rollouts",
    "parse_duration",
    "parse_share",
    "read_rollout",
    "results_by_version",
]
