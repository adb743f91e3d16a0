"""Analytic FLOPs of a prefill (multiply-add = 2 FLOPs), per strategy.

Counts the matmuls of the projections, the MLP, causal attention (QK^T and PV over the keys
each query may see) and the LM head for the one position whose logits are needed. Norms, RoPE
and softmax are left out (O(N*D), small beside the rest).
"""


def layer_matmul_flops(config):
    """FLOPs of one block's projections and MLP for one token."""
    d = config["hidden_size"]
    h = config["num_attention_heads"]
    hkv = config.get("num_key_value_heads") or h
    hd = config.get("head_dim") or d // h
    attn_proj = d * h * hd + 2 * d * hkv * hd + h * hd * d
    mlp = 3 * d * config["intermediate_size"]
    return 2 * (attn_proj + mlp)


def attention_flops(config, n_queries, n_past=0):
    """FLOPs of QK^T and PV for `n_queries` new tokens after `n_past` cached ones, causal."""
    h = config["num_attention_heads"]
    hd = config.get("head_dim") or config["hidden_size"] // h
    # Query j (0-based) sees n_past + j + 1 keys.
    keys_seen = n_queries * n_past + n_queries * (n_queries + 1) // 2
    return 2 * 2 * h * hd * keys_seen


def prefill_flops(config, n_tokens, n_past=0, layers=None):
    """FLOPs of an exact prefill of `n_tokens` new tokens through `layers` blocks (default:
    all) plus the LM head on the last token."""
    layers = config["num_hidden_layers"] if layers is None else layers
    per_layer = n_tokens * layer_matmul_flops(config) + attention_flops(config, n_tokens, n_past)
    head = 2 * config["hidden_size"] * config["vocab_size"]
    return layers * per_layer + head


def kvp_flops(config, n_tokens, aux_layers, predictor_in=None, predicted_layers=None,
              n_past=0, aux_config=None, tail=1, predictor_token_flops=None):
    """KV Prediction TTFT FLOPs: an aux of `aux_layers` blocks (of `aux_config`, default the
    base's) over N-tail tokens (no LM head), the predictor (per token `predictor_token_flops`,
    default a K and a V Linear of width `predictor_in` per predicted base layer, default all),
    and the base over the last `tail` tokens (1 in the paper) attending to all N positions."""
    d = config["hidden_size"]
    h = config["num_attention_heads"]
    hkv = config.get("num_key_value_heads") or h
    hd = config.get("head_dim") or d // h
    predictor_in = predictor_in or hkv * hd
    if predicted_layers is None:
        predicted_layers = config["num_hidden_layers"]
    tail = min(tail, n_tokens)
    m = n_tokens - tail
    acfg = aux_config or config
    aux = aux_layers * (m * layer_matmul_flops(acfg) + attention_flops(acfg, m, n_past))
    if predictor_token_flops is None:
        predictor_token_flops = predicted_layers * 2 * 2 * (predictor_in + 1) * hkv * hd
    predictor = m * predictor_token_flops
    base_step = prefill_flops(config, tail, n_past=n_past + m)
    return aux + predictor + base_step


def aux_only_flops(config, n_tokens, aux_layers, n_past=0, aux_config=None, **_):
    """The aux model alone: `aux_layers` blocks over all N tokens plus the LM head."""
    return prefill_flops(aux_config or config, n_tokens, n_past=n_past, layers=aux_layers)


def lazy_flops(config, n_tokens, tokens_per_layer, n_past=0, **_):
    """LazyLLM prefill: layer l runs tokens_per_layer[l] tokens (a shrinking subset) with
    causal attention among them, plus the LM head."""
    total = 2 * config["hidden_size"] * config["vocab_size"]
    for n_l in tokens_per_layer:
        total += n_l * layer_matmul_flops(config) + attention_flops(config, n_l, n_past)
    return total


def lazy_tokens_per_layer(n_layers, n_tokens, bounds, keep):
    """Tokens each layer runs under a schedule: its pruning layers and keep fractions."""
    out, n = [], n_tokens
    for i in range(n_layers):
        if i in bounds:
            n = max(1, min(n, int(round(keep[bounds.index(i)] * n))))
        out.append(n)
    return out


def gemfilter_flops(config, n_tokens, kept, filter_layer, **_):
    """GemFilter: layers 0..filter_layer over all N tokens (no LM head), then a full prefill
    of the `kept` tokens."""
    head = 2 * config["hidden_size"] * config["vocab_size"]
    if kept >= n_tokens:
        return prefill_flops(config, n_tokens)
    return prefill_flops(config, n_tokens, layers=filter_layer + 1) - head + prefill_flops(
        config, kept)


def specprefill_flops(config, n_tokens, kept, draft_config, draft_layers, lookahead, **_):
    """SpecPrefill: the draft's prefill of N tokens and `lookahead` decode steps (each with its
    LM head), then a prefill of the `kept` tokens by the base."""
    if kept >= n_tokens:
        return prefill_flops(config, n_tokens)
    draft = prefill_flops(draft_config, n_tokens, layers=draft_layers)
    for t in range(lookahead):
        draft += prefill_flops(draft_config, 1, n_past=n_tokens + t, layers=draft_layers)
    return draft + prefill_flops(config, kept)


def kvp_select_flops(config, n_tokens, kept, aux_layers, aux_config=None, tail=1, **pair):
    """kvp+specprefill: kvp (aux over N - tail tokens, predictor, base over the tail), the aux
    over the tail too (it scores the tokens), and the base over the `kept` tokens, whose
    attention is counted over every key of the prompt (an upper bound: each attends to the
    keys up to its own position)."""
    h = config["num_attention_heads"]
    hd = config.get("head_dim") or config["hidden_size"] // h
    tail = min(tail, n_tokens)
    m = n_tokens - tail
    acfg = aux_config or config
    aux_tail = aux_layers * (tail * layer_matmul_flops(acfg) + attention_flops(acfg, tail, m))
    exact = config["num_hidden_layers"] * kept * (layer_matmul_flops(config) + 2 * 2 * h * hd
                                                  * (m + tail))
    return kvp_flops(config, n_tokens, aux_layers, aux_config=aux_config, tail=tail,
                     **pair) + aux_tail + exact


def tsp_flops(config, n_tokens, **_):
    """The tsp baseline: every query scores all N keys (dense, then masked)."""
    h = config["num_attention_heads"]
    hd = config.get("head_dim") or config["hidden_size"] // h
    dense = 2 * 2 * h * hd * n_tokens * n_tokens
    return prefill_flops(config, n_tokens) + config["num_hidden_layers"] * (
        dense - attention_flops(config, n_tokens))


def pair_options(strategy):
    """kvp_flops / aux_only_flops options of a built kvp or aux-only strategy (MLX or mirror):
    its aux's depth (and own shape, for KVP-C), its predictor's per-token FLOPs and exact tail.
    Which count each strategy uses is declared in edgeprefill.prefill.registry."""
    aux = strategy.aux
    opts = {"aux_layers": aux.n_layers}
    base = getattr(strategy, "model", None)
    if base is not None and getattr(aux.model, "config", None) is not base.config:
        opts["aux_config"] = aux.model.config  # KVP-C: a model of its own shape
    pred = getattr(strategy, "predictor", None)
    if pred is not None:
        opts.update(predictor_token_flops=pred.token_flops(),
                    tail=getattr(strategy, "tail", 1))
    return opts
