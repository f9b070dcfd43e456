"""Splitting steepest descent as an NNI 3.0 NAS strategy, and the harness's runs as NNI trials: the adapter.

The maths stays in :mod:`nas_split` (no NNI there; only the CLI imports this package, when asked to); NNI keeps
strategies and evaluators apart, and so does this package.  One model is submitted per growth stage:

* **sequential engine** (default, model format ``raw``): the strategy keeps the live network, and each stage's
  evaluator grows it (analyze -> select -> split) and trains that very object in this process;
* **training-service engine** (``ts``, web UI): each stage is a trial of :class:`BackboneSpace` rebuilt from the
  previous stage's per-layer sizes; the trial continues from that stage's checkpoint, grows, trains and reports
  ``{"default": top-1, "mmacs", "params", "energy_uj_est", "widths", ...}``.

Modules:

* :mod:`~nas_split.nni.space`: :class:`BackboneSpace`, a ``search_spaces`` backbone as an NNI model space;
* :mod:`~nas_split.nni.evaluator`: :func:`train_stage` (one stage: continue from the previous stage's
  checkpoint, the growth method's round, train, save the stage checkpoint of :mod:`nas_split.checkpoints`,
  report) and :func:`stage_evaluator`, which builds it;
* :mod:`~nas_split.nni.strategy`: :class:`SplittingDescent`, a thin strategy that submits the stages of the
  engine's schedule (:func:`nas_split.engine.next_stage`) and keeps their history in its ``state_dict`` (the
  sequential engine does not restore its own);
* :mod:`~nas_split.nni.experiment`: :func:`build_experiment` / :func:`run_nni` for ``nas-split nni``, and the
  checks made before an experiment starts (:func:`check_experiment`, :func:`check_port`);
* :mod:`~nas_split.nni.trials`: ``nas-split compare --engine nni``: :func:`trial_executor`, the executor that
  runs compare's planned runs as NNI trials (:func:`compare_trial` each).
"""
import warnings

with warnings.catch_warnings():  # NNI 3.0 warns about torch's Buffer at import
    warnings.simplefilter("ignore")
    import nni.nas.evaluator  # noqa: F401
    import nni.nas.nn.pytorch  # noqa: F401
    import nni.nas.space  # noqa: F401
    import nni.nas.strategy  # noqa: F401

from .evaluator import stage_evaluator, train_stage  # noqa: E402
from .experiment import build_experiment, check_experiment, check_port, run_nni  # noqa: E402
from .space import BackboneSpace  # noqa: E402
from .strategy import SplittingDescent  # noqa: E402
from .trials import compare_trial, run_trials, trial_executor  # noqa: E402

__all__ = ["BackboneSpace", "SplittingDescent", "stage_evaluator", "train_stage", "check_port", "check_experiment",
           "build_experiment", "run_nni", "compare_trial", "run_trials", "trial_executor"]
