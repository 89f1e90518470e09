//! Which linear layers carry a LoRA adapter: PEFT's `target_modules` matching.

use crate::{Error, Result};

/// Resolves `targets` against a model's linear modules (full Hugging Face paths):
/// a module is targeted when its path equals a target or ends with `.<target>`, as in
/// PEFT. A target that matches no module is an error listing the module names that
/// exist, never a silently un-adapted model.
pub(crate) fn resolve(family: &str, targets: &[String], modules: &[String]) -> Result<Vec<bool>> {
    for target in targets {
        if !modules.iter().any(|m| matches(m, target)) {
            let mut suffixes: Vec<String> = modules
                .iter()
                .map(|m| strip_layer_prefix(m).to_string())
                .collect();
            suffixes.sort();
            suffixes.dedup();
            return Err(Error::Model(format!(
                "LoRA target `{target}` matches no module of {family}; its linear modules are: {}",
                suffixes.join(", ")
            )));
        }
    }
    Ok(modules
        .iter()
        .map(|m| targets.iter().any(|t| matches(m, t)))
        .collect())
}

fn matches(module: &str, target: &str) -> bool {
    module == target || module.ends_with(&format!(".{target}"))
}

/// `encoder.layer.3.attention.self.query` → `attention.self.query`: the part after the
/// layer index, which is what users write as a target.
fn strip_layer_prefix(module: &str) -> &str {
    let parts: Vec<&str> = module.split('.').collect();
    match parts.iter().rposition(|p| p.parse::<usize>().is_ok()) {
        Some(i) => {
            let skip: usize = parts[..=i].iter().map(|p| p.len() + 1).sum();
            &module[skip..]
        }
        None => module,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn modules() -> Vec<String> {
        [
            "h.0.attn.c_attn",
            "h.0.attn.c_proj",
            "h.0.mlp.c_fc",
            "h.0.mlp.c_proj",
        ]
        .map(String::from)
        .to_vec()
    }

    #[test]
    fn suffix_matching_as_peft_does() {
        let m = modules();
        assert_eq!(
            resolve("gpt2", &["c_proj".into()], &m).unwrap(),
            [false, true, false, true]
        );
        assert_eq!(
            resolve("gpt2", &["mlp.c_proj".into()], &m).unwrap(),
            [false, false, false, true]
        );
        assert_eq!(
            resolve("gpt2", &["h.0.attn.c_attn".into()], &m).unwrap(),
            [true, false, false, false]
        );
    }

    #[test]
    fn unknown_target_is_an_error_listing_modules() {
        let err = resolve("gpt2", &["query".into()], &modules())
            .unwrap_err()
            .to_string();
        assert!(err.contains("`query` matches no module of gpt2"), "{err}");
        assert!(
            err.contains("attn.c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj"),
            "{err}"
        );
        // Partial names do not match: `attn` is not a module.
        assert!(resolve("gpt2", &["c_att".into()], &modules()).is_err());
    }
}
