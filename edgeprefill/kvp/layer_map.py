"""Which auxiliary layers an aux model keeps, and which aux layer predicts each base layer.

KVP-LP (layer-pruned copy of the base): LP-0.75 drops every 4th layer, LP-0.50 keeps the even
layers, LP-0.25 keeps layers 0, 4, 8, ...; a base layer takes the last kept layer at or before it.
KVP-T (the base's first m layers): base layers below m are the aux's own (exact), deeper ones
are predicted from the last aux layer.
KVP-C (a separate smaller model): early aux layers cover two base layers each, late ones map
one-to-one (28-layer base from 16-layer aux: 0,0,1,1,...,11,11,12,13,14,15).
"""

LP_FRACTIONS = (0.75, 0.5, 0.25)


def lp_kept_layers(n_base, fraction):
    """Base layer indices a layer-pruned aux keeps, for fraction 0.75, 0.5 or 0.25."""
    if fraction == 0.75:
        return [i for i in range(n_base) if i % 4 != 3]
    if fraction == 0.5:
        return list(range(0, n_base, 2))
    if fraction == 0.25:
        return list(range(0, n_base, 4))
    raise ValueError(f"LP fraction must be one of {LP_FRACTIONS}, got {fraction}")


def lp_layer_map(n_base, kept):
    """j_i for a layer-pruned aux: the aux index of the last kept layer at or before base i."""
    out, j = [], -1
    kept_set = {k: a for a, k in enumerate(kept)}
    for i in range(n_base):
        if i in kept_set:
            j = kept_set[i]
        out.append(max(j, 0))
    return out


def truncated_layers(n_base, fraction):
    """How many leading base layers a truncated aux of `fraction` keeps (at least 1)."""
    return max(1, min(n_base, round(n_base * fraction)))


def truncated_layer_map(n_base, m):
    """j_i for a truncated aux of m layers: i below m, else the last aux layer."""
    return [min(i, m - 1) for i in range(n_base)]


def compact_layer_map(n_base, n_aux):
    """j_i for a separate aux with fewer layers: pairs first, then one-to-one; monotone."""
    if n_aux > n_base:
        raise ValueError(f"aux has more layers ({n_aux}) than the base ({n_base})")
    extra = n_base - n_aux
    if 2 * extra <= n_base:
        return [i // 2 if i < 2 * extra else i - extra for i in range(n_base)]
    return [i * n_aux // n_base for i in range(n_base)]


def validate_layer_map(layer_map, n_base, n_aux):
    """Raise ValueError unless the map has one monotone entry per base layer in range."""
    if len(layer_map) != n_base:
        raise ValueError(f"layer map has {len(layer_map)} entries for {n_base} base layers")
    if any(b < a for a, b in zip(layer_map, layer_map[1:])):
        raise ValueError("layer map is not monotone")
    if min(layer_map) < 0 or max(layer_map) >= n_aux:
        raise ValueError(f"layer map refers to aux layers outside 0..{n_aux - 1}")
