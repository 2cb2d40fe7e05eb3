//! `sparkle audit`: the security posture of a configuration, one line per check.

use super::load_config_unchecked;
use crate::audit::{self, Check, Depth};
use crate::config::Profile;
use crate::Common;
use anyhow::bail;

pub async fn run(common: Common) -> anyhow::Result<()> {
    let config = load_config_unchecked(&common)?;
    let mut lines = vec![match config.check() {
        Ok(()) => Check::pass("configuration", "valid"),
        Err(e) => Check::critical("configuration", format!("{e:#}")),
    }];
    lines.extend(audit::gather(&config, Depth::Full).await.checks);
    for line in &lines {
        println!("{line}");
    }
    let failed = lines.iter().filter(|c| c.failed()).count();
    let profile = match config.profile {
        Profile::Dev => "dev",
        Profile::Production => "production",
    };
    if failed == 0 {
        println!("{} checks, none fails ({profile} profile)", lines.len());
        return Ok(());
    }
    match config.profile {
        Profile::Production => bail!(
            "{failed} of {} checks fail under the production profile",
            lines.len()
        ),
        Profile::Dev => {
            println!(
                "{failed} of {} checks fail; the dev profile only reports them",
                lines.len()
            );
            Ok(())
        }
    }
}
