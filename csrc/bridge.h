// Shared by the C++ files of the bridge: how an error (a C++ exception) crosses into Rust.
#pragma once

#include <exception>

extern "C" {
// A malloc'ed copy of `message`, or nullptr if out of memory. Rust frees it with
// loratch_free_string.
char* loratch_copy_message(const char* message);
}

// Runs `body` and hands its outcome to Rust: nullptr on success, else the exception's message
// (malloc'ed; Rust frees it with loratch_free_string). `unknown` is the message for an exception
// that is not a std::exception.
template <typename Body>
char* loratch_guard(const char* unknown, Body&& body) noexcept {
  try {
    body();
    return nullptr;
  } catch (const std::exception& e) {
    return loratch_copy_message(e.what());
  } catch (...) {
    return loratch_copy_message(unknown);
  }
}
