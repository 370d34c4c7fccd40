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
