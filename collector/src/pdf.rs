//! `report --format pdf`: the HTML page printed by headless Chromium (the one edge of the
//! reports that runs another program).
//!
//! Rules: the browser is `$GPUMETER_CHROMIUM` (when set and not empty), else the first of `chromium`,
//! `chromium-browser`, `google-chrome` on `PATH`; none found is an error naming the Debian
//! package to install. The page is written to a private temporary directory with a throwaway
//! profile; Chromium runs without network access (the page's own Content-Security-Policy
//! forbids every fetch anyway), with its own header and footer off so that the page's print
//! stylesheet (A4 landscape, its footer in each page's margin) is what prints. A run past two
//! minutes is killed.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Why a PDF could not be made.
#[derive(Debug, thiserror::Error)]
pub enum PdfError {
    #[error(
        "headless Chromium not found: install it (Debian/Ubuntu: apt-get install chromium; fonts-noto-cjk for Korean) or set GPUMETER_CHROMIUM to its path"
    )]
    NoChromium,
    #[error("{what}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("chromium ({path}) failed ({status}): {stderr}")]
    Chromium {
        path: PathBuf,
        status: String,
        stderr: String,
    },
    #[error("chromium ({path}) ran past {limit_s} s")]
    Timeout { path: PathBuf, limit_s: u64 },
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> PdfError {
    let what = what.into();
    move |source| PdfError::Io { what, source }
}

/// The Chromium to print with, if any is installed.
pub fn find_chromium() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("GPUMETER_CHROMIUM").filter(|p| !p.is_empty()) {
        return Some(PathBuf::from(p));
    }
    let path = std::env::var_os("PATH")?;
    ["chromium", "chromium-browser", "google-chrome"]
        .iter()
        .flat_map(|name| std::env::split_paths(&path).map(move |d| d.join(name)))
        .find(|p| p.is_file())
}

/// `html` printed to PDF with the installed Chromium.
pub fn print_html(html: &str) -> Result<Vec<u8>, PdfError> {
    let chromium = find_chromium().ok_or(PdfError::NoChromium)?;
    print_html_with(&chromium, html)
}

/// `html` printed to PDF with the Chromium at `chromium`.
pub fn print_html_with(chromium: &Path, html: &str) -> Result<Vec<u8>, PdfError> {
    let dir = tempfile::tempdir().map_err(io("creating a temporary directory"))?;
    let page = dir.path().join("report.html");
    let pdf = dir.path().join("report.pdf");
    std::fs::write(&page, html).map_err(io(format!("writing {}", page.display())))?;
    let mut child = Command::new(chromium)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-pdf-header-footer",
        ])
        .arg(format!(
            "--user-data-dir={}",
            dir.path().join("profile").display()
        ))
        .arg(format!("--print-to-pdf={}", pdf.display()))
        .arg(format!("file://{}", page.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(io(format!("starting {}", chromium.display())))?;
    let limit = Duration::from_secs(120);
    let deadline = Instant::now() + limit;
    loop {
        if child
            .try_wait()
            .map_err(io("waiting for chromium"))?
            .is_some()
        {
            break;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(PdfError::Timeout {
                path: chromium.to_path_buf(),
                limit_s: limit.as_secs(),
            });
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = child
        .wait_with_output()
        .map_err(io("waiting for chromium"))?;
    match std::fs::read(&pdf) {
        Ok(bytes) if out.status.success() && bytes.starts_with(b"%PDF") => Ok(bytes),
        _ => Err(PdfError::Chromium {
            path: chromium.to_path_buf(),
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_browser_says_what_to_install() {
        let e = print_html_with(Path::new("/nonexistent/chromium"), "<p>x</p>").unwrap_err();
        assert!(
            e.to_string().contains("starting /nonexistent/chromium"),
            "{e}"
        );
        assert!(
            PdfError::NoChromium
                .to_string()
                .contains("apt-get install chromium")
        );
    }
}
