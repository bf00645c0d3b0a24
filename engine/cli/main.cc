// `ferry`: an offloading inference engine for batch generation. Errors print one line and exit
// non-zero: 2 for bad flags, 1 for everything else.
#include <csignal>
#include <cstdio>
#include <exception>

#include "engine/cli/commands.h"

namespace {

int Run(int argc, char** argv) {
  CLI::App app{"ferry: run language models larger than GPU memory, for batch offline generation"};
  app.require_subcommand(1);
  app.set_version_flag("--version", "ferry 0.1.0");
  ferry::cli::Runner runner;
  ferry::cli::RegisterCommands(app, &runner);
  try {
    app.parse(argc, argv);
  } catch (const CLI::CallForHelp&) {
    std::fputs(app.help().c_str(), stdout);
    return 0;
  } catch (const CLI::CallForAllHelp&) {
    std::fputs(app.help("", CLI::AppFormatMode::All).c_str(), stdout);
    return 0;
  } catch (const CLI::CallForVersion&) {
    std::puts("ferry 0.1.0");
    return 0;
  } catch (const CLI::ParseError& e) {
    if (e.get_exit_code() == 0) {  // a subcommand's --help
      return app.exit(e);
    }
    std::fprintf(stderr, "ferry: error: %s (try --help)\n", e.what());
    return 2;
  }
  if (!runner) {
    std::fprintf(stderr, "ferry: error: no command given (try --help)\n");
    return 2;
  }
  const absl::Status status = runner();
  if (!status.ok()) {
    std::fprintf(stderr, "ferry: error: %s\n", std::string(status.message()).c_str());
    return 1;
  }
  // Whatever went to standard output must have reached it (a full disk, a closed pipe).
  if (std::fflush(stdout) != 0 || std::ferror(stdout)) {
    std::fprintf(stderr, "ferry: error: writing standard output failed\n");
    return 1;
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  // A write past a file size limit or into a closed pipe is an error to report, not a signal.
  std::signal(SIGXFSZ, SIG_IGN);
  std::signal(SIGPIPE, SIG_IGN);
  try {
    return Run(argc, argv);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "ferry: error: %s\n", e.what());
  } catch (...) {
    std::fprintf(stderr, "ferry: error: an unexpected exception\n");
  }
  return 1;
}
