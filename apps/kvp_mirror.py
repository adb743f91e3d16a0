"""`kvp train --backend mirror`: move a pair to the torch mirror, train there, bring it back."""


def mirror_trainer(base, aux, pred, windows, train_aux, device, hp, copies=None):
    """(torch Trainer, torch aux) for an MLX base / aux / predictor; `copies`: the aux blocks
    to train (default all)."""
    import torch

    from edgeprefill.errors import EdgeprefillError
    from edgeprefill.mirror.kvp.train import aux_to_torch
    from edgeprefill.mirror.kvp.predictor import predictor_to_torch
    from edgeprefill.mirror.kvp.train import Trainer, trainable_aux
    from edgeprefill.mirror.loading import mirror_from_mlx

    if device == "cuda" and not torch.cuda.is_available():
        raise EdgeprefillError("--device cuda but torch sees no CUDA GPU: use --device cpu")
    if aux.kind == "C":
        raise EdgeprefillError("the mirror trainer supports auxes made of the base's blocks "
                               "(LP, T); train KVP-C with --backend mlx")
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    tbase = mirror_from_mlx(base, device=device)
    taux = aux_to_torch(aux, tbase)
    if hasattr(aux.model, "copied"):  # an --init artifact with trained aux blocks
        taux.model.train_copies(True)
    elif train_aux:
        taux = trainable_aux(taux, copies)
    tpred = predictor_to_torch(pred, device=device)
    return Trainer(tbase, taux, tpred, windows, device=device, **hp), taux


def export_trained(trainer, base, aux, pred, train_aux):
    """(MLX predictor, aux weights dict or None, MLX aux for evaluation) from a torch trainer."""
    import mlx.core as mx

    from edgeprefill.kvp.train import trainable_aux
    from edgeprefill.mirror.kvp.predictor import predictor_state_to_mlx
    from edgeprefill.mirror.kvp.train import AuxView

    predictor_state_to_mlx(trainer.predictor, pred)
    view = trainer.aux.model
    if not isinstance(view, AuxView):
        return pred, None, aux
    weights = {k: mx.array(v.detach().float().cpu().numpy())
               for k, v in view.aux_weights().items()}
    mlx_aux = aux if hasattr(aux.model, "copied") else trainable_aux(aux, view.copied)
    mlx_aux.model.load_aux_weights(weights)
    return pred, weights, mlx_aux
