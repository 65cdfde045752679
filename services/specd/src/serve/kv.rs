//! The target's KV budget flags: how many cache tokens its sequences may reserve together, given in
//! tokens or derived from a memory limit and the model's shape (TGI's `max-batch-total-tokens`). Admission
//! against it lives in `specd_worker::slots`.

use anyhow::bail;
use clap::Args;
use specd_engine::ModelConfig;

/// Default memory for the target's KV caches.
pub const DEFAULT_KV_MEMORY_MIB: u64 = 4096;

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
    /// request the model accepts fits.
    pub fn budget(&self, cfg: &ModelConfig) -> anyhow::Result<u64> {
        self.check()?;
        let tokens = if self.kv_tokens > 0 {
            self.kv_tokens
        } else {
            (self.kv_memory_mib << 20) / cfg.kv_bytes_per_token().max(1) as u64
        };
        if tokens < cfg.context as u64 {
            bail!(
                "the KV budget of {tokens} tokens is smaller than the model's context of {} (raise \
                 --kv-tokens or --kv-memory-mib; one token takes {} bytes)",
                cfg.context,
                cfg.kv_bytes_per_token()
            );
        }
        Ok(tokens)
    }
}
