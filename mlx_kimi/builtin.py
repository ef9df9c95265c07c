"""Built-in descriptions of the real Kimi models (configs from ../shared/kimi-facts.md).

Plain data, so that naming a model needs no MLX import.
"""

KIMI_BOS_ID = 163584
KIMI_EOS_IDS = [163585, 163586]  # [EOS] and <|im_end|>
# Expert routing of every Kimi K2 model (DeepSeek-V3's, one group) and its one dense first layer.
KIMI_ROUTING = {
    "topk_method": "noaux_tc",
    "scoring_func": "sigmoid",
    "norm_topk_prob": True,
    "n_group": 1,
    "topk_group": 1,
    "first_k_dense_replace": 1,
    "moe_layer_freq": 1,
}

_K2_TEXT = {
    "vocab_size": 163840,
    "hidden_size": 7168,
    "intermediate_size": 18432,
    "moe_intermediate_size": 2048,
    "num_hidden_layers": 61,
    "num_attention_heads": 64,
    "num_key_value_heads": 64,
    "n_shared_experts": 1,
    "n_routed_experts": 384,
    "num_experts_per_tok": 8,
    "routed_scaling_factor": 2.827,
    "kv_lora_rank": 512,
    "q_lora_rank": 1536,
    "qk_rope_head_dim": 64,
    "qk_nope_head_dim": 128,
    "v_head_dim": 128,
    **KIMI_ROUTING,
    "rope_theta": 50000.0,
    "tie_word_embeddings": False,
    "bos_token_id": KIMI_BOS_ID,
    "eos_token_id": KIMI_EOS_IDS,
}

_K25_TEXT = {
    **_K2_TEXT,
    "model_type": "deepseek_v3",
    "rms_norm_eps": 1e-5,
    "max_position_embeddings": 262144,
    "rope_scaling": {
        "type": "yarn", "factor": 64.0, "beta_fast": 32.0, "beta_slow": 1.0,
        "mscale": 1.0, "mscale_all_dim": 1.0, "original_max_position_embeddings": 4096,
    },
}

BUILTIN_MODELS = {
    "kimi-k2": {
        **_K2_TEXT,
        "model_type": "kimi_k2",
        "rms_norm_eps": 1e-6,
        "max_position_embeddings": 262144,
        "rope_scaling": {
            "type": "yarn", "factor": 64.0, "beta_fast": 1.0, "beta_slow": 1.0,
            "mscale": 1.0, "mscale_all_dim": 1.0, "original_max_position_embeddings": 4096,
        },
    },
    "kimi-k2.5": {"model_type": "kimi_k25", "text_config": _K25_TEXT},
    "kimi-k2.6": {"model_type": "kimi_k25", "text_config": _K25_TEXT},
}
