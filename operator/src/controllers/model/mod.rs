//! The Model controller: fetch the source (`source`), verify its digest, inspect it,
//! compress it behind the accuracy gate (`compress`), store it content-addressed and
//! write the versions into status. `plan` decides; `controller` carries out.

pub mod compress;
pub mod controller;
pub mod plan;
pub mod source;

pub use controller::{CONTROLLER, run};
