//! The `-p` progress bar of the long-running verbs (convert, commit, rebase): bytes done of bytes
//! in all, drawn with indicatif, or nothing at all without `-p`.

use indicatif::{ProgressBar, ProgressStyle};

/// A progress bar that may be switched off.
pub struct Bar(Option<ProgressBar>);

impl Bar {
    /// A bar, drawn only when `shown`.
    pub fn new(shown: bool) -> Self {
        Bar(shown.then(|| {
            let bar = ProgressBar::new(0);
            if let Ok(style) = ProgressStyle::with_template(
                "{bar:40} {bytes}/{total_bytes} ({percent}%) {bytes_per_sec} eta {eta}",
            ) {
                bar.set_style(style);
            }
            bar
        }))
    }

    /// Shows `done` of `total` bytes.
    pub fn update(&self, done: u64, total: u64) {
        if let Some(bar) = &self.0 {
            bar.set_length(total);
            bar.set_position(done);
        }
    }

    /// Draws the bar full and leaves it on screen.
    pub fn finish(&self) {
        if let Some(bar) = &self.0 {
            bar.finish();
        }
    }
}
