//! Chat templates: FastChat's Vicuna formats byte for byte, and the model's own Jinja template.

use std::path::Path;

use minijinja::{Environment, ErrorKind, context};
use serde::Serialize;

use crate::{PromptError, Result};

/// One chat message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

impl Message {
    /// A message with the given role and content.
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self { role: role.into(), content: content.into() }
    }
}

const VICUNA_SYSTEM: &str = "A chat between a curious user and an artificial intelligence assistant. \
The assistant gives helpful, detailed, and polite answers to the user's questions.";

const ONE_SHOT_SYSTEM: &str = "A chat between a curious human and an artificial intelligence assistant. \
The assistant gives helpful, detailed, and polite answers to the human's questions.";

const ONE_SHOT_EXAMPLE: [(&str, &str); 2] = [
    ("Human", "What are the key differences between renewable and non-renewable energy sources?"),
    (
        "Assistant",
        "Renewable energy sources are those that can be replenished naturally in a relatively \
short amount of time, such as solar, wind, hydro, geothermal, and biomass. \
Non-renewable energy sources, on the other hand, are finite and will eventually be \
depleted, such as coal, oil, and natural gas. Here are some key differences between \
renewable and non-renewable energy sources:\n\
1. Availability: Renewable energy sources are virtually inexhaustible, while non-renewable \
energy sources are finite and will eventually run out.\n\
2. Environmental impact: Renewable energy sources have a much lower environmental impact \
than non-renewable sources, which can lead to air and water pollution, greenhouse gas emissions, \
and other negative effects.\n\
3. Cost: Renewable energy sources can be more expensive to initially set up, but they typically \
have lower operational costs than non-renewable sources.\n\
4. Reliability: Renewable energy sources are often more reliable and can be used in more remote \
locations than non-renewable sources.\n\
5. Flexibility: Renewable energy sources are often more flexible and can be adapted to different \
situations and needs, while non-renewable sources are more rigid and inflexible.\n\
6. Sustainability: Renewable energy sources are more sustainable over the long term, while \
non-renewable sources are not, and their depletion can lead to economic and social instability.",
    ),
];

/// A chat template.
#[derive(Debug, Clone)]
pub enum ChatTemplate {
    /// FastChat `vicuna_v1.1`: `SYSTEM USER: .. ASSISTANT: ..</s>USER: .. ASSISTANT:`.
    VicunaV11,
    /// FastChat `one_shot` (Vicuna v0): `Human`/`Assistant` turns after one worked example.
    OneShot,
    /// A Jinja template with the special-token texts it may refer to.
    Jinja { source: String, bos_token: String, eos_token: String },
}

/// Where the engine's template came from, for logs and `ModelInfo`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TemplateSource {
    Flag,
    ModelName,
    Model,
    Fallback,
}

impl ChatTemplate {
    /// A built-in template by FastChat name.
    pub fn builtin(name: &str) -> Option<Self> {
        match name {
            "vicuna_v1.1" | "vicuna" => Some(Self::VicunaV11),
            "one_shot" => Some(Self::OneShot),
            _ => None,
        }
    }

    /// Chooses a template: `--chat-template NAME|FILE` > a model path naming Vicuna >
    /// the model's own Jinja template > `vicuna_v1.1`.
    pub fn choose(
        flag: Option<&str>,
        model_path: &Path,
        model_template: Option<String>,
        bos_token: &str,
        eos_token: &str,
    ) -> Result<(Self, TemplateSource)> {
        let jinja = |source: String| Self::Jinja { source, bos_token: bos_token.into(), eos_token: eos_token.into() };
        if let Some(flag) = flag {
            if let Some(t) = Self::builtin(flag) {
                return Ok((t, TemplateSource::Flag));
            }
            let path = Path::new(flag);
            if !path.is_file() {
                return Err(PromptError::Template(format!(
                    "--chat-template {flag}: neither a built-in template (vicuna_v1.1, one_shot) nor a readable file"
                )));
            }
            let source = std::fs::read_to_string(path)
                .map_err(|e| PromptError::Template(format!("--chat-template {flag}: {e}")))?;
            let t = jinja(source);
            t.check()?;
            return Ok((t, TemplateSource::Flag));
        }
        // FastChat's rule: a Vicuna path selects its template, v0 the one-shot one.
        let name = model_path.file_name().map(|n| n.to_string_lossy().to_lowercase()).unwrap_or_default();
        if name.contains("vicuna") {
            let t = if name.contains("v0") { Self::OneShot } else { Self::VicunaV11 };
            return Ok((t, TemplateSource::ModelName));
        }
        if let Some(source) = model_template {
            let t = jinja(source);
            t.check()?;
            return Ok((t, TemplateSource::Model));
        }
        tracing::warn!(
            "{} has no chat template and its name does not say Vicuna: using vicuna_v1.1 (set --chat-template to change)",
            model_path.display()
        );
        Ok((Self::VicunaV11, TemplateSource::Fallback))
    }

    /// A short name for logs.
    pub fn name(&self) -> &'static str {
        match self {
            Self::VicunaV11 => "vicuna_v1.1",
            Self::OneShot => "one_shot",
            Self::Jinja { .. } => "jinja",
        }
    }

    /// Stop strings the template implies (FastChat's `stop_str`).
    pub fn default_stops(&self) -> &'static [&'static str] {
        match self {
            Self::OneShot => &["###"],
            _ => &[],
        }
    }

    fn check(&self) -> Result<()> {
        self.render(&[Message::new("user", "hi")], true).map(|_| ())
    }

    /// Renders a conversation. A leading `system` message replaces the template's default;
    /// `add_generation_prompt` ends the text where the assistant's answer starts.
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        for m in messages {
            if !matches!(m.role.as_str(), "system" | "user" | "assistant") {
                return Err(PromptError::InvalidArgument(format!(
                    "message role {:?} is not one of system, user, assistant",
                    m.role
                )));
            }
        }
        match self {
            Self::VicunaV11 => {
                Ok(fastchat(messages, add_generation_prompt, VICUNA_SYSTEM, ["USER", "ASSISTANT"], &[], [" ", "</s>"]))
            }
            Self::OneShot => Ok(fastchat(
                messages,
                add_generation_prompt,
                ONE_SHOT_SYSTEM,
                ["Human", "Assistant"],
                &ONE_SHOT_EXAMPLE,
                ["\n### ", "\n### "],
            )),
            Self::Jinja { source, bos_token, eos_token } => {
                let mut env = Environment::new();
                minijinja_contrib::add_to_environment(&mut env);
                env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
                env.add_function("raise_exception", |msg: String| -> std::result::Result<String, minijinja::Error> {
                    Err(minijinja::Error::new(ErrorKind::InvalidOperation, msg))
                });
                let tmpl = env.template_from_str(source).map_err(|e| PromptError::Template(e.to_string()))?;
                tmpl.render(context! {
                    messages => minijinja::value::Serde(messages),
                    add_generation_prompt => add_generation_prompt,
                    bos_token => bos_token,
                    eos_token => eos_token,
                })
                .map_err(|e| PromptError::Template(e.to_string()))
            }
        }
    }
}

/// FastChat's ADD_COLON_TWO / ADD_COLON_SINGLE rendering (single is two equal separators).
fn fastchat(
    messages: &[Message],
    add_generation_prompt: bool,
    default_system: &str,
    roles: [&str; 2],
    examples: &[(&str, &str)],
    seps: [&str; 2],
) -> String {
    let (system, rest) = match messages.split_first() {
        Some((first, rest)) if first.role == "system" => (first.content.as_str(), rest),
        _ => (default_system, messages),
    };
    let turns = rest
        .iter()
        .filter(|m| m.role != "system")
        .map(|m| (if m.role == "user" { roles[0] } else { roles[1] }, m.content.as_str()));
    let mut out = format!("{system}{}", seps[0]);
    for (i, (role, content)) in examples.iter().copied().chain(turns).enumerate() {
        out.push_str(&format!("{role}: {content}{}", seps[i % 2]));
    }
    if add_generation_prompt {
        out.push_str(&format!("{}:", roles[1]));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vicuna_two_turns_with_custom_system_matches_fastchat() {
        let msgs = [
            Message::new("system", "You are a pirate."),
            Message::new("user", "Hello!"),
            Message::new("assistant", "Ahoy, matey!"),
            Message::new("user", "Where is the treasure?"),
        ];
        let got = ChatTemplate::VicunaV11.render(&msgs, true).unwrap();
        // What FastChat's get_conv_template("vicuna_v1.1") produces for the same conversation.
        let want = "You are a pirate. USER: Hello! ASSISTANT: Ahoy, matey!</s>USER: Where is the treasure? ASSISTANT:";
        assert_eq!(got, want);
    }

    #[test]
    fn vicuna_default_system() {
        let got = ChatTemplate::VicunaV11.render(&[Message::new("user", "Hi")], true).unwrap();
        assert_eq!(
            got,
            "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, \
             detailed, and polite answers to the user's questions. USER: Hi ASSISTANT:"
        );
    }

    #[test]
    fn one_shot_keeps_the_example_and_stops_at_hashes() {
        let got = ChatTemplate::OneShot.render(&[Message::new("user", "Hi")], true).unwrap();
        assert!(got.starts_with(&format!("{ONE_SHOT_SYSTEM}\n### Human: What are the key differences")), "{got}");
        assert!(got.ends_with("economic and social instability.\n### Human: Hi\n### Assistant:"), "{got}");
        assert_eq!(ChatTemplate::OneShot.default_stops(), &["###"]);
    }

    #[test]
    fn jinja_renders_with_pycompat_methods_and_raise() {
        let t = ChatTemplate::Jinja {
            source: "{{ bos_token }}{% for m in messages %}{% if m.role == 'assistant' and loop.first %}\
                     {{ raise_exception('must start with user') }}{% endif %}[{{ m.role }}]{{ m.content.strip() }}\
                     {% endfor %}{% if add_generation_prompt %}[assistant]{% endif %}"
                .into(),
            bos_token: "<s>".into(),
            eos_token: "</s>".into(),
        };
        assert_eq!(t.render(&[Message::new("user", "  hi  ")], true).unwrap(), "<s>[user]hi[assistant]");
        let e = t.render(&[Message::new("assistant", "x")], true).unwrap_err().to_string();
        assert!(e.contains("must start with user"), "{e}");
    }

    #[test]
    fn choice_order() {
        let p = Path::new("/models/vicuna-7b-v1.5");
        let own = Some("{{ messages[0].content }}".to_string());
        let (t, s) = ChatTemplate::choose(None, p, own.clone(), "<s>", "</s>").unwrap();
        assert!(matches!(t, ChatTemplate::VicunaV11) && s == TemplateSource::ModelName);
        let (t, _) = ChatTemplate::choose(None, Path::new("/m/vicuna-13b-delta-v0"), None, "", "").unwrap();
        assert!(matches!(t, ChatTemplate::OneShot));
        let (t, s) = ChatTemplate::choose(Some("one_shot"), p, own.clone(), "", "").unwrap();
        assert!(matches!(t, ChatTemplate::OneShot) && s == TemplateSource::Flag);
        let (t, s) = ChatTemplate::choose(None, Path::new("/m/smollm.gguf"), own, "", "").unwrap();
        assert!(matches!(t, ChatTemplate::Jinja { .. }) && s == TemplateSource::Model);
        let (_, s) = ChatTemplate::choose(None, Path::new("/m/llama"), None, "", "").unwrap();
        assert_eq!(s, TemplateSource::Fallback);
        let e = ChatTemplate::choose(Some("nope"), p, None, "", "").unwrap_err().to_string();
        assert!(e.contains("--chat-template nope"), "{e}");
    }

    #[test]
    fn unknown_role_is_rejected() {
        let e = ChatTemplate::VicunaV11.render(&[Message::new("tool", "x")], true).unwrap_err();
        assert!(matches!(e, PromptError::InvalidArgument(_)));
    }
}
