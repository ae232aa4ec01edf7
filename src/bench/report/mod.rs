//! Renderings of a [`super::model::Report`]: the console table, the HTML page (with SVG
//! plots) and the README's Markdown section. JSON is the report itself, through serde.

pub mod html;
pub mod markdown;
mod plots;
pub mod table;
