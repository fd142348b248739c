//! Embeds an rpath to the libtorch that torch-sys linked, so `towerstream` and every test and
//! bench binary start without `LD_LIBRARY_PATH`.
fn main() {
    // torch-sys (`links = "tch"`) exports its library directory as DEP_TCH_LIBTORCH_LIB.
    if let Ok(dir) = std::env::var("DEP_TCH_LIBTORCH_LIB") {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{dir}");
    }
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
}
