//! Links `lull-zygote` to the libpython that pyo3 found, with that library's directory as the
//! binary's rpath: interpreters such as pyenv's keep `libpython3.x.so` outside the loader's
//! default path, and the zygote must start without `LD_LIBRARY_PATH`.

fn main() {
    pyo3_build_config::add_libpython_rpath_link_args();
}
