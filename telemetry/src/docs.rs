//! Man pages and shell completions, generated from a binary's clap definition so they cannot
//! drift from the flags it parses.

use std::io::Write;

pub use clap_complete::Shell;

/// The man pages (section 1) of `cmd`: `NAME.1` for the binary and `NAME-SUB.1` (and
/// `NAME-SUB-SUBSUB.1`) for each visible subcommand, as git names its pages. Returns
/// (file name, roff text) pairs.
pub fn man_pages(cmd: clap::Command) -> std::io::Result<Vec<(String, Vec<u8>)>> {
    let mut pages = Vec::new();
    collect(cmd, &mut pages)?;
    Ok(pages)
}

fn collect(cmd: clap::Command, pages: &mut Vec<(String, Vec<u8>)>) -> std::io::Result<()> {
    let name = cmd.get_name().to_string();
    let mut roff = Vec::new();
    clap_mangen::Man::new(cmd.clone()).render(&mut roff)?;
    pages.push((format!("{name}.1"), roff));
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        if sub.get_name() == "help" {
            continue;
        }
        let full = format!("{name}-{}", sub.get_name());
        collect(sub.clone().name(full), pages)?;
    }
    Ok(())
}

/// Writes the completion script of `cmd` for `shell`. A reader that goes away early (a closed
/// pipe) is not an error.
pub fn completions(
    shell: Shell,
    mut cmd: clap::Command,
    out: &mut dyn Write,
) -> std::io::Result<()> {
    let name = cmd.get_name().to_string();
    // clap_complete panics on a failed write, so the script is built in memory first.
    let mut script = Vec::new();
    clap_complete::generate(shell, &mut cmd, name, &mut script);
    match out.write_all(&script).and_then(|()| out.flush()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        r => r,
    }
}

/// A Markdown reference of a TOML config file, generated from the JSON Schema of its config
/// type (`schemars::schema_for!`): one table per section, each key with its type, default and
/// the doc comment of its field. Sections are the nested tables (`[collector]`); a section
/// whose `kind` picks a variant lists each variant's keys.
pub fn config_reference(title: &str, schema: &serde_json::Value) -> String {
    let mut out = format!(
        "# {title}\n\nGenerated from the config types (`{} config-reference`); do not edit by hand.\n",
        title.split_whitespace().next().unwrap_or(title)
    );
    if let Some(d) = schema.get("description").and_then(|d| d.as_str()) {
        out.push_str(&format!("\n{}\n", d.trim()));
    }
    section(&mut out, schema, schema, "", None, "");
    out
}

fn resolve<'a>(root: &'a serde_json::Value, s: &'a serde_json::Value) -> &'a serde_json::Value {
    if let Some(r) = s.get("$ref").and_then(|r| r.as_str()) {
        let name = r.rsplit('/').next().unwrap_or(r);
        if let Some(d) = root.get("$defs").and_then(|d| d.get(name)) {
            return resolve(root, d);
        }
    }
    // `Option<T>`: anyOf [T, null].
    if let Some(any) = s.get("anyOf").and_then(|a| a.as_array()) {
        let non_null: Vec<_> = any
            .iter()
            .filter(|v| v.get("type").and_then(|t| t.as_str()) != Some("null"))
            .collect();
        if non_null.len() == 1 {
            return resolve(root, non_null[0]);
        }
    }
    s
}

fn is_table(s: &serde_json::Value) -> bool {
    s.get("properties").is_some()
}

fn variants(s: &serde_json::Value) -> Option<&Vec<serde_json::Value>> {
    let v = s.get("oneOf").and_then(|o| o.as_array())?;
    v.iter().all(is_table).then_some(v)
}

fn type_of(root: &serde_json::Value, s: &serde_json::Value) -> String {
    let optional = s.get("anyOf").and_then(|a| a.as_array()).is_some_and(|a| {
        a.iter()
            .any(|v| v.get("type").and_then(|t| t.as_str()) == Some("null"))
    }) || s
        .get("type")
        .and_then(|t| t.as_array())
        .is_some_and(|t| t.iter().any(|v| v == "null"));
    let r = resolve(root, s);
    let consts: Vec<String> = r
        .get("enum")
        .and_then(|e| e.as_array())
        .cloned()
        .or_else(|| {
            r.get("oneOf").and_then(|o| o.as_array()).map(|o| {
                o.iter()
                    .filter_map(|v| v.get("const").or_else(|| v.get("enum")?.get(0)).cloned())
                    .collect()
            })
        })
        .unwrap_or_default()
        .iter()
        .map(|v| v.to_string())
        .collect();
    let base = if !consts.is_empty() {
        consts.join(" \\| ")
    } else {
        match r.get("type") {
            Some(serde_json::Value::String(t)) => t.clone(),
            Some(serde_json::Value::Array(t)) => t
                .iter()
                .filter_map(|v| v.as_str())
                .filter(|v| *v != "null")
                .collect::<Vec<_>>()
                .join(" or "),
            _ => "value".to_string(),
        }
    };
    if optional {
        format!("{base} (optional)")
    } else {
        base
    }
}

fn describe(s: &serde_json::Value, resolved: &serde_json::Value) -> String {
    s.get("description")
        .or_else(|| resolved.get("description"))
        .and_then(|d| d.as_str())
        .unwrap_or("")
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
        .replace('|', "\\|")
}

fn section(
    out: &mut String,
    root: &serde_json::Value,
    table: &serde_json::Value,
    path: &str,
    parent_defaults: Option<&serde_json::Value>,
    desc: &str,
) {
    let Some(props) = table.get("properties").and_then(|p| p.as_object()) else {
        return;
    };
    let required: Vec<&str> = table
        .get("required")
        .and_then(|r| r.as_array())
        .map(|r| r.iter().filter_map(|v| v.as_str()).collect())
        .unwrap_or_default();
    let mut rows = String::new();
    let mut nested = Vec::new();
    for (key, s) in props {
        let r = resolve(root, s);
        if is_table(r) || variants(r).is_some() {
            nested.push((key, s, r));
            continue;
        }
        let default = s
            .get("default")
            .or_else(|| parent_defaults.and_then(|d| d.get(key)))
            .map(|d| format!("`{d}`"))
            .unwrap_or_else(|| {
                if required.contains(&key.as_str()) {
                    "required".to_string()
                } else {
                    "none".to_string()
                }
            });
        rows.push_str(&format!(
            "| `{key}` | {} | {default} | {} |\n",
            type_of(root, s),
            describe(s, r)
        ));
    }
    if !path.is_empty() {
        out.push_str(&format!("\n## `[{path}]`\n"));
        if !desc.is_empty() {
            out.push_str(&format!("\n{desc}\n"));
        }
    }
    if !rows.is_empty() {
        out.push_str("\n| key | type | default | meaning |\n| --- | --- | --- | --- |\n");
        out.push_str(&rows);
    }
    for (key, s, r) in nested {
        let sub = if path.is_empty() {
            key.clone()
        } else {
            format!("{path}.{key}")
        };
        let defaults = s.get("default");
        if let Some(vs) = variants(r) {
            out.push_str(&format!("\n## `[{sub}]`\n"));
            let d = describe(s, r);
            if !d.is_empty() {
                out.push_str(&format!("\n{d}\n"));
            }
            if let Some(def) = defaults {
                out.push_str(&format!("\nDefault: `{def}`.\n"));
            }
            for v in vs {
                let tag = v
                    .get("properties")
                    .and_then(|p| p.as_object())
                    .and_then(|p| p.iter().find_map(|(k, t)| Some((k, t.get("const")?))));
                let name = tag.map(|(k, c)| format!("{k} = {c}")).unwrap_or_default();
                out.push_str(&format!("\n### `{name}`\n"));
                let d = describe(v, v);
                if !d.is_empty() {
                    out.push_str(&format!("\n{d}\n"));
                }
                let mut rows = String::new();
                if let Some(p) = v.get("properties").and_then(|p| p.as_object()) {
                    for (k, t) in p {
                        if t.get("const").is_some() {
                            continue;
                        }
                        let rt = resolve(root, t);
                        let default = t
                            .get("default")
                            .map(|d| format!("`{d}`"))
                            .unwrap_or_else(|| "required".into());
                        rows.push_str(&format!(
                            "| `{k}` | {} | {default} | {} |\n",
                            type_of(root, t),
                            describe(t, rt)
                        ));
                    }
                }
                if !rows.is_empty() {
                    out.push_str(
                        "\n| key | type | default | meaning |\n| --- | --- | --- | --- |\n",
                    );
                    out.push_str(&rows);
                }
            }
        } else {
            section(out, root, r, &sub, defaults, &describe(s, r));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cli() -> clap::Command {
        clap::Command::new("tool")
            .about("A tool")
            .subcommand(
                clap::Command::new("grants")
                    .about("Grants")
                    .subcommand(clap::Command::new("import").arg(clap::Arg::new("file"))),
            )
            .subcommand(clap::Command::new("secret").hide(true))
    }

    #[test]
    fn one_page_per_visible_command() {
        let pages = man_pages(cli()).unwrap();
        let names: Vec<_> = pages.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["tool.1", "tool-grants.1", "tool-grants-import.1"]);
        let top = String::from_utf8(pages[0].1.clone()).unwrap();
        assert!(top.contains(".TH tool 1"), "{top}");
        assert!(top.contains("grants"), "{top}");
        let import = String::from_utf8(pages[2].1.clone()).unwrap();
        assert!(import.contains("file"), "{import}");
    }

    #[test]
    fn completions_name_the_subcommands() {
        let mut out = Vec::new();
        completions(Shell::Bash, cli(), &mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(text.contains("grants"), "{text}");
        assert!(text.contains("import"), "{text}");
    }
}
