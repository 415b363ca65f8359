"""CellFlow (Klein, Fleck, Becker et al. 2025) through the authors' ``cellflow-tools`` package.

The network, OT-coupled flow matching and data handling are cellflow's own; this wrapper adds
what a pipeline job needs around them: PCA-space inputs from the train-fitted basis, ESM2 gene
embeddings as perturbation representations, a training loop with resumable checkpoints, and a
sampler that compiles one ODE solve for all conditions (``CellFlow.predict`` re-traces it for every
condition): fixed-step Euler (``sampling.solver: euler``, the pipeline's) or the adaptive solver the
card's run used through ``cf.predict``'s defaults (``tsit5``: diffrax Tsit5, PIDController rtol = atol =
1e-5, dt0 None), or ``dopri5`` (diffrax Dopri5, same controller).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

import anndata as ad
import numpy as np
import pandas as pd

from ..data.conditions import genes_of
from ..data.source import CONDITION, IS_CONTROL
from ..io import atomic_path, write_text
from ..training import Preempted, StopFlag, TrainLog
from .base import ModelContext, checkpoint_key, job_cached, spec_of

MODEL_FILE = "CellFlow.pkl"
STATE_FILE = "state.json"
REP_KEY = "esm2"
GENE_COLUMNS = ("gene_1", "gene_2")
CONTROL_KEY = "control"


def _cellflow_view(adata: ad.AnnData, context: ModelContext) -> ad.AnnData:
    """Cells in train-PCA space with cellflow's covariate columns: one column per combination slot."""
    view = ad.AnnData(
        X=np.zeros((adata.n_obs, 1), dtype=np.float32),
        obs=pd.DataFrame(index=adata.obs_names.copy()),
    )
    view.obsm["X_pca"] = context.pca.transform(adata.X)
    slots = [genes_of(c, context.control_label) for c in adata.obs[CONDITION]]
    for i, column in enumerate(GENE_COLUMNS):
        # an empty slot holds the control label, whose embedding is the zero vector
        view.obs[column] = pd.Categorical([g[i] if len(g) > i else context.control_label for g in slots])
    view.obs[CONTROL_KEY] = adata.obs[IS_CONTROL].to_numpy(dtype=bool)
    view.obs[CONDITION] = adata.obs[CONDITION].astype(str).to_numpy()
    view.uns[REP_KEY] = _embedding_table(context, view.obs[list(GENE_COLUMNS)].stack().unique())
    return view


def _embedding_table(context: ModelContext, genes) -> dict[str, np.ndarray]:
    missing = [g for g in genes if g not in context.embeddings and g != context.control_label]
    if missing:
        raise ValueError(f"no ESM2 embedding for perturbed genes {missing[:5]}")
    dim = len(next(iter(context.embeddings.values())))
    return {g: np.asarray(context.embeddings.get(g, np.zeros(dim)), dtype=np.float32) for g in genes}


def _prepare_model_kwargs(model: Mapping[str, Any]) -> dict[str, Any]:
    """Config (plain YAML values) -> ``CellFlow.prepare_model`` arguments (callables and tuples)."""
    import functools

    import optax
    from cellflow.utils import match_linear

    kwargs = dict(model)
    kwargs["match_fn"] = functools.partial(match_linear, **kwargs.pop("match_fn", {}))
    opt = kwargs.pop("optimizer")
    kwargs["optimizer"] = optax.MultiSteps(optax.adam(opt["learning_rate"]), opt["every_k_schedule"])
    for key in ("hidden_dims", "decoder_dims", "time_encoder_dims"):
        if key in kwargs:
            kwargs[key] = tuple(kwargs[key])
    if "layers_before_pool" in kwargs:
        kwargs["layers_before_pool"] = {k: (dict(v),) for k, v in kwargs["layers_before_pool"].items()}
    if "layers_after_pool" in kwargs:
        kwargs["layers_after_pool"] = (dict(kwargs["layers_after_pool"]),)
    return kwargs


def build_cellflow(train: ad.AnnData, context: ModelContext, params: Mapping[str, Any]):
    """A CellFlow object with data and network prepared, untrained."""
    from cellflow.model import CellFlow

    cf = CellFlow(_cellflow_view(train, context), solver=params.get("solver", "otfm"))
    cf.prepare_data(
        sample_rep="X_pca",
        control_key=CONTROL_KEY,
        perturbation_covariates={"target_gene": GENE_COLUMNS},
        perturbation_covariate_reps={"target_gene": REP_KEY},
        max_combination_length=len(GENE_COLUMNS),
    )
    cf.prepare_model(**_prepare_model_kwargs(params["model"]), seed=context.seed)
    return cf


STEP_ATTR = "_perturb_repro_step"  # the step a pickled CellFlow was saved at, inside the pickle itself


def _save(cf, checkpoint_dir: Path, step: int) -> None:
    """Model (carrying its step) atomically, then the step marker for people and tools. Resume reads the step
    from the pickle: a SIGKILL between the two writes must not pair the new weights with the old step."""
    setattr(cf, STEP_ATTR, step)
    with atomic_path(checkpoint_dir / MODEL_FILE) as tmp:
        import cloudpickle

        with open(tmp, "wb") as handle:
            cloudpickle.dump(cf, handle)
    write_text(json.dumps({"step": step}), checkpoint_dir / STATE_FILE)


def load_cellflow(checkpoint_dir: Path):
    from cellflow.model import CellFlow

    return CellFlow.load(str(Path(checkpoint_dir) / MODEL_FILE))


def train_steps(
    cf, start: int, stop: int, batch_size: int, seed: int, log: TrainLog, flag: StopFlag | None, sampler=None
) -> int:
    """Run cellflow's own step function from ``start`` to ``stop``; return the next step.

    The batch and step keys are folded from (seed, step), so a resumed run draws what an
    uninterrupted one would have drawn at the same step. Pass the same ``sampler`` across calls:
    a new one re-traces and re-compiles cellflow's jitted batch sampler.
    """
    import jax
    from cellflow.data._dataloader import TrainSampler

    sampler = sampler or TrainSampler(data=cf.train_data, batch_size=batch_size)
    root = jax.random.PRNGKey(seed)
    step = start
    while step < stop:
        rng_batch, rng_step = jax.random.split(jax.random.fold_in(root, step))
        loss = cf.solver.step_fn(rng_step, sampler.sample(rng_batch))
        log.add(step, float(loss))
        step += 1
        if flag is not None and flag.raised:
            break
    cf.solver.is_trained = True
    return step


class CellFlowModel:
    def fit(self, train, val, context: ModelContext, params, checkpoint_dir: Path) -> None:
        checkpoint_dir = Path(checkpoint_dir)
        checkpoint_dir.mkdir(parents=True, exist_ok=True)
        training = params["training"]
        total = int(training["num_iterations"])
        if int(training.get("valid_freq", total)) < total:
            # cf.train's valid_freq: the card's value exceeds its budget (no mid-training evaluation), which is
            # what this trainer does; a smaller one would ask for evaluations it does not run
            raise ValueError(f"training.valid_freq {training['valid_freq']} < num_iterations {total}: mid-training "
                             "validation is not run here (the card's valid_freq exceeds its budget)")
        every = int(training.get("checkpoint_every") or total)
        state = checkpoint_dir / STATE_FILE
        start, cf = 0, None
        if (checkpoint_dir / MODEL_FILE).exists():
            cf = load_cellflow(checkpoint_dir)
            saved = getattr(cf, STEP_ATTR, None)  # checkpoints from before the step lived in the pickle: the marker
            start = int(saved) if saved is not None else (json.loads(state.read_text())["step"] if state.exists() else 0)
        if not start:
            cf = build_cellflow(train, context, params)
        log = TrainLog(checkpoint_dir / "train_log.csv", start)
        from cellflow.data._dataloader import TrainSampler

        batch_size = int(training["batch_size"])
        sampler = TrainSampler(data=cf.train_data, batch_size=batch_size)
        try:
            with StopFlag() as flag:
                step = start
                while step < total:
                    step = train_steps(cf, step, min(step + every, total), batch_size, context.seed, log, flag, sampler)
                    log.flush()
                    _save(cf, checkpoint_dir, step)
                    if flag.raised:
                        raise Preempted(f"signal {flag.raised} at step {step}; state saved, rerun to resume")
                if start == total:
                    cf.solver.is_trained = True
        finally:
            log.close()

    SOLVERS = spec_of("cellflow").solvers  # the config check refuses any other sampling.solver

    def sample(self, checkpoint_dir, conditions, control, n_cells, context, params, sampling):
        ckpt = checkpoint_key(checkpoint_dir)
        cf = job_cached(self, ("cellflow", ckpt), lambda: load_cellflow(Path(checkpoint_dir)))
        # one FlowSampler (one jit) per job and solver settings: the per-condition seed only picks source cells
        solver_key = tuple(str(sampling.get(k)) for k in SOLVER_KEYS)
        flow = job_cached(self, ("sampler", ckpt, solver_key), lambda: FlowSampler(cf, sampling))
        rng = np.random.default_rng(int(sampling.get("seed", 0)))
        n_ctrl = int(control.obs[IS_CONTROL].sum())
        pick = rng.choice(n_ctrl, size=n_cells, replace=n_cells > n_ctrl)
        source = control[np.flatnonzero(control.obs[IS_CONTROL].to_numpy())[pick]].copy()
        source.obs_names_make_unique()  # drawn with replacement when n_cells exceeds the controls
        z = flow.predict(_cellflow_view(source, context), conditions, context)
        return {c: context.pca.inverse(z[c]) for c in conditions}


SOLVERS = CellFlowModel.SOLVERS
SOLVER_KEYS = ("solver", "steps", "rtol", "atol", "max_steps")  # every sampling key diffrax_settings reads


def diffrax_settings(sampling: Mapping[str, Any]) -> dict[str, Any]:
    """``diffrax.diffeqsolve`` keyword arguments of the sampler ``sampling`` names: ``euler`` with ``steps``
    constant steps, or ``tsit5`` / ``dopri5`` with cf.predict's controller (PIDController, rtol/atol 1e-5 unless
    given; dt0 None: diffrax picks the first step) and ``max_steps`` (diffrax's 4096 unless given)."""
    import diffrax

    solver = str(sampling.get("solver") or "euler")
    if solver == "euler":
        return {"solver": diffrax.Euler(), "dt0": 1.0 / int(sampling["steps"]),
                "stepsize_controller": diffrax.ConstantStepSize()}
    if solver in ("tsit5", "dopri5"):
        controller = diffrax.PIDController(rtol=float(sampling.get("rtol", 1e-5)), atol=float(sampling.get("atol", 1e-5)))
        kwargs = {"solver": diffrax.Tsit5() if solver == "tsit5" else diffrax.Dopri5(), "dt0": None,
                  "stepsize_controller": controller}
        if sampling.get("max_steps"):
            kwargs["max_steps"] = int(sampling["max_steps"])
        return kwargs
    raise ValueError(f"sampling.solver must be one of {SOLVERS} for CellFlow, not {solver!r}")


class FlowSampler:
    """Integrates CellFlow's learned ODE from t=0 to 1 with the sampler ``sampling`` names (``diffrax_settings``).

    One jitted, vmapped solve serves every condition (their source and condition arrays share
    shapes), so compilation happens once instead of once per condition. The vector field is the one
    ``OTFlowMatching.predict`` uses; under vmap each cell's adaptive solve takes its own steps, as there.
    """

    def __init__(self, cf, sampling: Mapping[str, Any]) -> None:
        import diffrax
        import jax
        import jax.numpy as jnp

        self.cf = cf
        settings = diffrax_settings(sampling)
        solver = cf.solver
        apply_fn = solver.vf_state.apply_fn

        def field(t, x, args):
            params, condition, noise = args
            return apply_fn({"params": params}, t, x, condition, noise, train=False)[0]

        def solve(params, x, condition, noise):
            return diffrax.diffeqsolve(
                diffrax.ODETerm(field), t0=0.0, t1=1.0, y0=x, args=(params, condition, noise), **settings
            ).ys[0]

        self._solve = jax.jit(jax.vmap(solve, in_axes=[None, 0, None, None]))
        self._noise = jnp.zeros((1, solver.vf.condition_embedding_dim))

    def batches(self, view: ad.AnnData, conditions: list[str]):
        """cellflow's own prediction batches: source cells and condition arrays keyed by condition."""
        from cellflow.data._dataloader import PredictionSampler

        table = self.cf._dm  # the DataManager built at training time knows the covariate layout
        covariates = pd.DataFrame({CONDITION: conditions})
        for i, column in enumerate(GENE_COLUMNS):
            covariates[column] = [
                (genes_of(c, view.uns["control_label"]) + [view.uns["control_label"]] * 2)[i] for c in conditions
            ]
        for column in GENE_COLUMNS:
            covariates[column] = pd.Categorical(covariates[column])
        data = table.get_prediction_data(
            view, sample_rep="X_pca", covariate_data=covariates, condition_id_key=CONDITION, rep_dict=view.uns
        )
        batch = PredictionSampler(data).sample()
        return batch["source"], batch["condition"], covariates

    def predict(self, view: ad.AnnData, conditions: list[str], context: ModelContext) -> dict[str, np.ndarray]:
        """Predicted PCA-space cells per condition."""
        view.uns["control_label"] = context.control_label
        view.uns[REP_KEY] = _embedding_table(
            context, sorted({g for c in conditions for g in genes_of(c, context.control_label)} | {context.control_label})
        )
        sources, conds, _ = self.batches(view, conditions)
        params = self.cf.solver.vf_state.params
        return {c: np.asarray(self._solve(params, sources[c], conds[c], self._noise)) for c in conditions}


class EulerSampler(FlowSampler):
    """``FlowSampler`` with ``steps`` fixed Euler steps."""

    def __init__(self, cf, steps: int) -> None:
        super().__init__(cf, {"solver": "euler", "steps": steps})
