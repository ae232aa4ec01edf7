//! The image tool's error: a message for the user, printed as `snapvmm img: error: ...`.

use std::fmt;
use std::path::Path;

/// A failed `snapvmm img` verb. Every message names the file, option or argument at fault;
/// `main` prints it and exits 1.
#[derive(Debug)]
pub struct CliError {
    message: String,
}

impl CliError {
    /// An error with `message` as it is.
    pub fn new(message: impl Into<String>) -> Self {
        CliError {
            message: message.into(),
        }
    }

    /// "could not open 'FILE': ..." for an error raised while opening `path`. The storage
    /// layer's messages usually start with the path already, so it is not repeated.
    pub fn open(path: &Path, err: impl fmt::Display) -> Self {
        let shown = path.display().to_string();
        let text = err.to_string();
        let detail = text
            .strip_prefix(&format!("{shown}: "))
            .unwrap_or(&text)
            .to_string();
        CliError::new(format!("could not open '{shown}': {detail}"))
    }
}

impl fmt::Display for CliError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for CliError {}

impl From<storage::Error> for CliError {
    fn from(e: storage::Error) -> Self {
        // storage's messages already name the file, offset or field at fault.
        CliError::new(e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn open_error_does_not_repeat_the_path() {
        let e = CliError::open(Path::new("a.qcow2"), "a.qcow2: open: No such file");
        assert_eq!(
            e.to_string(),
            "could not open 'a.qcow2': open: No such file"
        );
    }
}
