//! `sparkle discord register`: registers the `/sparkle` slash command with Discord.

use super::{catalog, load_config};
use crate::secrets::read_secret_file;
use crate::{Common, Serve};
use anyhow::Context;
use clap::Subcommand;

#[derive(Debug, Subcommand)]
pub enum DiscordCommand {
    /// Register (or update) the /sparkle command, globally or in one server. Needs
    /// discord.application_id, discord.bot_token_file and --model (for the choices offered).
    Register {
        #[command(flatten)]
        common: Common,
        #[command(flatten)]
        serve: Serve,
        /// Register in this server only (takes effect at once; global commands can take a while).
        #[arg(long, value_name = "ID")]
        guild: Option<String>,
    },
}

pub async fn run(command: DiscordCommand) -> anyhow::Result<()> {
    let DiscordCommand::Register {
        common,
        serve,
        guild,
    } = command;
    let config = load_config(&common, Some(&serve))?;
    let app = config
        .discord
        .application_id
        .as_deref()
        .context("discord.application_id is not set")?;
    let token_file = config
        .discord
        .bot_token_file
        .as_deref()
        .context("discord.bot_token_file is not set")?;
    let token = read_secret_file(token_file)?;
    let catalog = catalog(&config.model_paths()?)?;
    let native = catalog
        .models
        .first()
        .map(|m| m.default_width)
        .unwrap_or(512);
    let tall = (native * 3 / 2) / 64 * 64;
    let sizes = vec![
        format!("{native}x{native}"),
        format!("{native}x{tall}"),
        format!("{tall}x{native}"),
    ];
    let schedulers: Vec<&str> = sparkle_core::Scheduler::ALL
        .iter()
        .map(|s| s.as_str())
        .collect();
    let models: Vec<String> = catalog.models.iter().map(|m| m.name.clone()).collect();
    let definition = sparkle_discord::sparkle_command(&sizes, &schedulers, &models);
    let rest = sparkle_discord::DiscordRest::new(&config.discord.api_base)?;
    rest.register_command(&token, app, guild.as_deref(), &definition)
        .await
        .context("Discord refused the command")?;
    match guild {
        Some(guild) => eprintln!("registered /sparkle in server {guild}"),
        None => eprintln!(
            "registered /sparkle globally (Discord may take a while to show it everywhere)"
        ),
    }
    Ok(())
}
