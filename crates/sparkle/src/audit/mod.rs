//! The security posture of a configuration, one check at a time: what `sparkle audit`
//! prints, and what `sparkle up` and `sparkle gateway` consult before they listen.
//!
//! Each check looks at the configuration and at the files it names (certificate, keys,
//! secrets, data directory, database) and says `pass`, `fail` or `n/a`, with the reason in
//! words. A failure is *critical* when serving with it would expose data or credentials; the
//! production profile refuses to start on a critical failure, and `sparkle audit` exits
//! non-zero on any failure under the production profile. The dev profile only reports.
//!
//! The checks read; they never create or repair anything.

mod access;
mod at_rest;
mod transit;

use crate::config::{Config, Profile};
use std::fmt;

/// How thorough a look to take.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Depth {
    /// Configuration and files only: fast enough for every start.
    Startup,
    /// Also reads every stored image's header and the database, to show that everything
    /// stored is sealed under keys the keyring holds.
    Full,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Status {
    Pass,
    Fail {
        /// Serving with this would expose data or credentials.
        critical: bool,
    },
    /// Not applicable to this deployment.
    NotApplicable,
}

/// One line of the audit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Check {
    pub name: &'static str,
    pub status: Status,
    pub reason: String,
}

impl Check {
    pub fn pass(name: &'static str, reason: impl Into<String>) -> Check {
        Check {
            name,
            status: Status::Pass,
            reason: reason.into(),
        }
    }

    pub fn fail(name: &'static str, reason: impl Into<String>) -> Check {
        Check {
            name,
            status: Status::Fail { critical: false },
            reason: reason.into(),
        }
    }

    pub fn critical(name: &'static str, reason: impl Into<String>) -> Check {
        Check {
            name,
            status: Status::Fail { critical: true },
            reason: reason.into(),
        }
    }

    pub fn not_applicable(name: &'static str, reason: impl Into<String>) -> Check {
        Check {
            name,
            status: Status::NotApplicable,
            reason: reason.into(),
        }
    }

    pub fn failed(&self) -> bool {
        matches!(self.status, Status::Fail { .. })
    }

    pub fn is_critical(&self) -> bool {
        self.status == Status::Fail { critical: true }
    }
}

impl fmt::Display for Check {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let status = match self.status {
            Status::Pass => "pass",
            Status::Fail { .. } => "fail",
            Status::NotApplicable => "n/a",
        };
        write!(f, "{status:<4}  {:<13} {}", self.name, self.reason)?;
        if self.is_critical() {
            f.write_str(" [critical]")?;
        }
        Ok(())
    }
}

/// Every check, in the order they are printed.
#[derive(Debug, Clone)]
pub struct Report {
    pub profile: Profile,
    pub checks: Vec<Check>,
}

impl Report {
    pub fn failures(&self) -> impl Iterator<Item = &Check> {
        self.checks.iter().filter(|c| c.failed())
    }

    /// Refuses to go on under the production profile when a critical check fails; under the
    /// dev profile, failures are logged and the service starts.
    pub fn refuse_critical(&self) -> anyhow::Result<()> {
        let critical: Vec<String> = self
            .checks
            .iter()
            .filter(|c| c.is_critical())
            .map(|c| format!("{}: {}", c.name, c.reason))
            .collect();
        if self.profile == Profile::Production && !critical.is_empty() {
            anyhow::bail!(
                "the production profile refuses to start: {} (run `sparkle audit` with the same settings for every check)",
                critical.join("; ")
            );
        }
        for check in self.failures() {
            tracing::warn!(check = check.name, reason = %check.reason, "security check fails");
        }
        Ok(())
    }
}

/// Runs every check against `config`.
pub async fn gather(config: &Config, depth: Depth) -> Report {
    let mut checks = vec![transit::tls(config), transit::certificate(config, now())];
    checks.push(at_rest::encryption(config, depth).await);
    checks.push(access::secrets(config));
    checks.push(transit::database(config, depth, now()).await);
    checks.push(transit::database_role(config, depth).await);
    checks.push(access::admin(config));
    checks.push(access::workers(config));
    checks.push(at_rest::images(config));
    checks.push(access::api_keys(config, depth).await);
    checks.push(access::limits(config));
    checks.push(transit::outbound(config));
    checks.push(access::profile(config));
    Report {
        profile: config.profile,
        checks,
    }
}

fn now() -> i64 {
    crate::keyring::now()
}

/// `mode` as the octal digits `ls -l` users know.
fn mode_of(path: &std::path::Path) -> Option<u32> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::metadata(path)
            .ok()
            .map(|m| m.permissions().mode() & 0o777)
    }
    #[cfg(not(unix))]
    {
        let _ = path;
        None
    }
}

#[cfg(test)]
mod tests;
