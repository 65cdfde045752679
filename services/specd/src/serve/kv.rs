//! The target's KV budget flags: how many cache tokens its sequences may reserve together, given in
//! tokens or derived from a memory limit and the model's shape (TGI's `max-batch-total-tokens`). Admission
//! against it lives in `specd_worker::slots`.

use anyhow::bail;
use clap::Args;
use specd_engine::ModelConfig;

/// Default memory for the target's KV caches.
pub const DEFAULT_KV_MEMORY_MIB: u64 = 2048;

#[derive(Debug, Clone, Args)]
pub struct KvArgs {
    /// KV cache tokens the target's sequences may reserve together (each reserves its prompt, its
    /// max_new_tokens and one longest draft, capped at the context); 0: derive it from --kv-memory-mib.
    #[arg(long, env = "SPECD_KV_TOKENS", default_value_t = 0)]
    pub kv_tokens: u64,
    /// Memory for the target's KV caches, in MiB, when --kv-tokens is 0.
    #[arg(long, env = "SPECD_KV_MEMORY_MIB", default_value_t = DEFAULT_KV_MEMORY_MIB)]
    pub kv_memory_mib: u64,
}

impl KvArgs {
    /// Checks what needs no model file.
    pub fn check(&self) -> anyhow::Result<()> {
        if self.kv_tokens == 0 && self.kv_memory_mib == 0 {
            bail!("--kv-memory-mib must be at least 1 when --kv-tokens is 0");
        }
        Ok(())
    }

    /// The budget in tokens for a model of this shape: at least one full context, so that any one
    /// request the model accepts fits. An explicit `--kv-tokens` below that is refused; a budget derived
    /// from the memory limit is raised to it, with a warning.
    pub fn budget(&self, cfg: &ModelConfig) -> anyhow::Result<u64> {
        self.check()?;
        let context = cfg.context as u64;
        let per_token = cfg.kv_bytes_per_token().max(1) as u64;
        if self.kv_tokens > 0 {
            if self.kv_tokens < context {
                bail!(
                    "--kv-tokens {} is smaller than the model's context of {context}: a request that \
                     fills the context could never be placed",
                    self.kv_tokens
                );
            }
            return Ok(self.kv_tokens);
        }
        let tokens = (self.kv_memory_mib << 20) / per_token;
        if tokens < context {
            tracing::warn!(
                kv_memory_mib = self.kv_memory_mib,
                tokens,
                context,
                bytes_per_token = per_token,
                "the KV memory holds less than one full context; budgeting one context instead"
            );
            return Ok(context);
        }
        Ok(tokens)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use specd_engine::{Family, RopeStyle};

    fn cfg(context: usize) -> ModelConfig {
        ModelConfig {
            family: Family::Qwen2,
            hidden: 64,
            layers: 2,
            ffn: 128,
            heads: 4,
            kv_heads: 2,
            head_dim: 16,
            vocab: 256,
            context,
            rms_eps: 1e-6,
            rope_theta: 10000.0,
            rope: RopeStyle::Halves,
        }
    }

    #[test]
    fn budgets_come_from_tokens_or_memory_and_hold_one_context() {
        // 2 layers x 32 kv dims x (k, v) x 4 bytes = 512 bytes per position.
        let c = cfg(1024);
        assert_eq!(c.kv_bytes_per_token(), 512);
        let from_memory = KvArgs {
            kv_tokens: 0,
            kv_memory_mib: 1,
        };
        assert_eq!(from_memory.budget(&c).unwrap(), 2048);
        assert_eq!(
            from_memory.budget(&cfg(4096)).unwrap(),
            4096,
            "raised to one context"
        );
        let explicit = KvArgs {
            kv_tokens: 5000,
            kv_memory_mib: 1,
        };
        assert_eq!(explicit.budget(&c).unwrap(), 5000);
        let small = KvArgs {
            kv_tokens: 100,
            kv_memory_mib: 1,
        };
        assert!(small.budget(&c).is_err());
        assert!(KvArgs {
            kv_tokens: 0,
            kv_memory_mib: 0
        }
        .check()
        .is_err());
    }
}
