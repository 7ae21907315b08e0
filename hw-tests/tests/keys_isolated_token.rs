//! An isolated token is visible to a child process given its environment, and only to it.

use std::process::Command;

use anyhow::{ensure, Result};
use tlsgate_hw_tests::softhsm::{self, TestToken};

#[test]
fn a_child_process_sees_its_isolated_token() -> Result<()> {
    if let Some(why) = softhsm::unavailable() {
        tlsgate_hw_tests::skip::missing(why);
        return Ok(());
    }
    let token = TestToken::new_isolated()?;
    let show = |env: &[(String, String)]| -> Result<String> {
        let out = Command::new("softhsm2-util")
            .arg("--show-slots")
            .envs(env.iter().cloned())
            .output()?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    };
    ensure!(
        show(&token.env())?.contains(token.label()),
        "child does not see the token"
    );
    // Another isolated token lives elsewhere: neither sees the other's.
    let other = TestToken::new_isolated()?;
    ensure!(!show(&other.env())?.contains(token.label()));
    ensure!(
        token.open().is_err(),
        "an isolated token must not be opened in-process"
    );
    let dir = token.conf_path().parent().map(|p| p.to_owned());
    drop(token);
    ensure!(
        dir.is_some_and(|d| !d.exists()),
        "isolated token directory left behind"
    );
    Ok(())
}
