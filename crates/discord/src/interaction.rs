use serde::Deserialize;
use std::collections::HashMap;

/// An interaction as Discord sends it to the HTTP endpoint. Fields Sparkle does not use are
/// ignored, so new fields Discord adds do not break parsing.
#[derive(Debug, Clone, Deserialize)]
pub struct Interaction {
    pub id: String,
    pub application_id: String,
    #[serde(rename = "type")]
    pub kind: InteractionKind,
    pub data: Option<CommandData>,
    pub guild_id: Option<String>,
    pub channel_id: Option<String>,
    /// In a server: the member, whose `user` is the person.
    pub member: Option<Member>,
    /// In a DM: the person.
    pub user: Option<User>,
    /// Lets the application answer for 15 minutes. A secret.
    pub token: String,
    /// Largest attachment the response may carry, in bytes.
    pub attachment_size_limit: Option<u64>,
}

/// Discord's interaction types.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(from = "u8")]
pub enum InteractionKind {
    Ping,
    ApplicationCommand,
    MessageComponent,
    Autocomplete,
    ModalSubmit,
    Other(u8),
}

impl From<u8> for InteractionKind {
    fn from(value: u8) -> Self {
        match value {
            1 => InteractionKind::Ping,
            2 => InteractionKind::ApplicationCommand,
            3 => InteractionKind::MessageComponent,
            4 => InteractionKind::Autocomplete,
            5 => InteractionKind::ModalSubmit,
            other => InteractionKind::Other(other),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
pub struct Member {
    pub user: User,
}

#[derive(Debug, Clone, Deserialize)]
pub struct User {
    pub id: String,
    #[serde(default)]
    pub username: String,
}

/// The command (or, for components, the button) the interaction is about.
#[derive(Debug, Clone, Deserialize)]
pub struct CommandData {
    /// The command's name (application commands).
    pub name: Option<String>,
    #[serde(default)]
    pub options: Vec<CommandOption>,
    /// The component's id (buttons).
    pub custom_id: Option<String>,
    /// What the options refer to: the files attached to the command.
    #[serde(default)]
    pub resolved: Resolved,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct Resolved {
    /// By attachment id, which the attachment option's value names.
    #[serde(default)]
    pub attachments: HashMap<String, AttachedFile>,
}

/// A file attached to a command, as Discord describes it (it is fetched from `url`).
#[derive(Debug, Clone, Deserialize)]
pub struct AttachedFile {
    #[serde(default)]
    pub filename: String,
    /// Bytes, as Discord reports them.
    #[serde(default)]
    pub size: u64,
    pub url: String,
    pub content_type: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct CommandOption {
    pub name: String,
    pub value: Option<OptionValue>,
    /// In an autocomplete interaction: the option being typed.
    #[serde(default)]
    pub focused: bool,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum OptionValue {
    Integer(i64),
    Number(f64),
    Bool(bool),
    String(String),
}

impl Interaction {
    /// The person who invoked it, in a server or in a DM.
    pub fn invoker(&self) -> Option<&User> {
        self.member.as_ref().map(|m| &m.user).or(self.user.as_ref())
    }

    /// The file an attachment option names, when it was given.
    pub fn attachment(&self, name: &str) -> Option<Result<&AttachedFile, String>> {
        let OptionValue::String(id) = self.option(name)? else {
            return Some(Err(format!("`{name}` must be a file")));
        };
        let data = self.data.as_ref()?;
        Some(
            data.resolved
                .attachments
                .get(id)
                .ok_or_else(|| format!("Discord did not describe the file given as `{name}`")),
        )
    }

    /// In an autocomplete interaction, the option being typed: its name and what is typed
    /// so far.
    pub fn focused(&self) -> Option<(&str, &str)> {
        let option = self.data.as_ref()?.options.iter().find(|o| o.focused)?;
        let typed = match &option.value {
            Some(OptionValue::String(s)) => s.as_str(),
            _ => "",
        };
        Some((option.name.as_str(), typed))
    }

    /// An option of the command by name.
    pub fn option(&self, name: &str) -> Option<&OptionValue> {
        self.data
            .as_ref()?
            .options
            .iter()
            .find(|o| o.name == name)?
            .value
            .as_ref()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_guild_and_dm_commands_and_pings() {
        let guild = r#"{"id":"1","application_id":"9","type":2,"token":"t","version":1,
            "guild_id":"5","channel_id":"6","locale":"en-US",
            "member":{"user":{"id":"42","username":"ada"},"roles":[]},
            "data":{"id":"77","name":"sparkle","type":1,"options":[
                {"name":"prompt","type":3,"value":"a corgi"},{"name":"steps","type":4,"value":20},
                {"name":"guidance","type":10,"value":7.5}]},
            "attachment_size_limit":10485760}"#;
        let i: Interaction = serde_json::from_str(guild).expect("guild");
        assert_eq!(i.kind, InteractionKind::ApplicationCommand);
        assert_eq!(i.invoker().map(|u| u.id.as_str()), Some("42"));
        assert_eq!(
            i.option("prompt"),
            Some(&OptionValue::String("a corgi".into()))
        );
        assert_eq!(i.option("steps"), Some(&OptionValue::Integer(20)));
        assert_eq!(i.option("guidance"), Some(&OptionValue::Number(7.5)));
        assert_eq!(i.attachment_size_limit, Some(10_485_760));

        let dm = r#"{"id":"2","application_id":"9","type":2,"token":"t","channel_id":"6",
            "user":{"id":"43","username":"bob"},"data":{"name":"sparkle","options":[]}}"#;
        let i: Interaction = serde_json::from_str(dm).expect("dm");
        assert_eq!(i.invoker().map(|u| u.id.as_str()), Some("43"));
        assert!(i.guild_id.is_none());

        let ping: Interaction =
            serde_json::from_str(r#"{"id":"3","application_id":"9","type":1,"token":"t"}"#)
                .expect("ping");
        assert_eq!(ping.kind, InteractionKind::Ping);
        let odd: Interaction =
            serde_json::from_str(r#"{"id":"3","application_id":"9","type":42,"token":"t"}"#)
                .expect("odd");
        assert_eq!(odd.kind, InteractionKind::Other(42));

        let typing = r#"{"id":"4","application_id":"9","type":4,"token":"t",
            "user":{"id":"43"},"data":{"name":"sparkle","options":[
                {"name":"prompt","type":3,"value":"a corgi"},
                {"name":"lora","type":3,"value":"water","focused":true}]}}"#;
        let i: Interaction = serde_json::from_str(typing).expect("autocomplete");
        assert_eq!(i.kind, InteractionKind::Autocomplete);
        assert_eq!(i.focused(), Some(("lora", "water")));
        assert_eq!(ping.focused(), None);
    }
}
