//! Asking before a command that cannot be undone (deleting an image, aborting a rollout): a yes on the terminal,
//! or `--yes` for scripts. Without a terminal and without `--yes` nothing happens.

use std::io::{BufRead as _, IsTerminal as _, Write as _};

use crate::error::UsageError;

/// Ok when `yes` was given or the person at the terminal answers yes to `question`.
pub(crate) fn confirm(question: &str, yes: bool) -> anyhow::Result<()> {
    if yes {
        return Ok(());
    }
    let stdin = std::io::stdin();
    if !stdin.is_terminal() {
        return Err(UsageError(format!(
            "{question} — not confirmed: there is no terminal to ask; pass --yes to confirm"
        ))
        .into());
    }
    eprint!("{question} [y/N] ");
    std::io::stderr().flush()?;
    let mut answer = String::new();
    stdin.lock().read_line(&mut answer)?;
    if is_yes(&answer) {
        Ok(())
    } else {
        Err(anyhow::anyhow!("not confirmed; nothing was changed"))
    }
}

fn is_yes(answer: &str) -> bool {
    matches!(answer.trim().to_lowercase().as_str(), "y" | "yes")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_yes_confirms() {
        assert!(is_yes("y\n"));
        assert!(is_yes(" YES "));
        assert!(!is_yes(""));
        assert!(!is_yes("n"));
        assert!(!is_yes("yes please"));
    }

    #[test]
    fn yes_skips_the_question() {
        assert!(confirm("Delete?", true).is_ok());
    }
}
