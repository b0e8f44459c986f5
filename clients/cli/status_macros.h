// Early-return helpers for absl::Status / absl::StatusOr, local to the clients folder.
//
// Abseil 20220623 ships no status macros; these two cover what the CLI needs.
#ifndef SPARSEKV_CLIENTS_CLI_STATUS_MACROS_H_
#define SPARSEKV_CLIENTS_CLI_STATUS_MACROS_H_

#include <utility>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

// Evaluates `expr` (an absl::Status) and returns it from the enclosing function when not OK.
#define SKV_RETURN_IF_ERROR(expr)              \
  do {                                         \
    const absl::Status skv_status_ = (expr);   \
    if (!skv_status_.ok()) return skv_status_; \
  } while (0)

#define SKV_STATUS_CONCAT_INNER_(a, b) a##b
#define SKV_STATUS_CONCAT_(a, b) SKV_STATUS_CONCAT_INNER_(a, b)

// `lhs` is a declaration or an lvalue; `expr` an absl::StatusOr<T>. Returns the error from the
// enclosing function, otherwise moves the value into `lhs`.
#define SKV_ASSIGN_OR_RETURN(lhs, expr) \
  SKV_ASSIGN_OR_RETURN_IMPL_(SKV_STATUS_CONCAT_(skv_statusor_, __LINE__), lhs, expr)

#define SKV_ASSIGN_OR_RETURN_IMPL_(statusor, lhs, expr) \
  auto statusor = (expr);                               \
  if (!statusor.ok()) return statusor.status();         \
  lhs = std::move(statusor).value()

#endif  // SPARSEKV_CLIENTS_CLI_STATUS_MACROS_H_
