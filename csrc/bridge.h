// Shared by the C++ files of the bridge: how an error message crosses into Rust.
#pragma once

extern "C" {
// A malloc'ed copy of `message`, or nullptr if out of memory. Rust frees it with
// loratch_free_string.
char* loratch_copy_message(const char* message);
}
