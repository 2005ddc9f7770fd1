"""Model building blocks below whole models: FFNs, routers, LM heads, positions, norms,
residuals, routed branches, balance losses and regularisers, the forward context and the
KV cache. Attention schemes live in moa/attention/."""
