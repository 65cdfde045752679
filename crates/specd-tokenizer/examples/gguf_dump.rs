//! Prints a GGUF file's metadata (abbreviated), tensor count and the tokenizer summary.
//!
//! Usage: `cargo run -p specd-tokenizer --example gguf_dump -- MODEL.gguf [TEXT]`

use specd_tokenizer::{GgufMeta, SpecdTokenizer};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let path = args.next().ok_or("usage: gguf_dump MODEL.gguf [TEXT]")?;
    let meta = GgufMeta::open(&path)?;
    println!(
        "GGUF v{} — {} keys, {} tensors, alignment {}, data at {}",
        meta.version(),
        meta.metadata().len(),
        meta.tensors().len(),
        meta.alignment(),
        meta.data_offset()
    );
    for (k, v) in meta.metadata() {
        println!("  {k} = {v}");
    }
    match SpecdTokenizer::from_gguf_meta(&meta) {
        Ok(tok) => {
            println!(
                "tokenizer: vocab {} bos {:?} eos {:?} stop {:?} fingerprint {}",
                tok.vocab_size(),
                tok.bos_id(),
                tok.eos_id(),
                tok.stop_ids(),
                tok.fingerprint()
            );
            if let Some(text) = args.next() {
                let ids = tok.encode(&text, false)?;
                println!("{text:?} -> {ids:?}");
            }
        }
        Err(e) => println!("tokenizer: {e}"),
    }
    Ok(())
}
