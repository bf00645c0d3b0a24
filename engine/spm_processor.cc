#include "engine/spm_processor.h"

#if FERRY_HAVE_SENTENCEPIECE
#include <sentencepiece_processor.h>
#endif

namespace ferry::engine {

#if FERRY_HAVE_SENTENCEPIECE
struct SpmProcessor::Impl {
  sentencepiece::SentencePieceProcessor sp;
};

SpmProcessor::~SpmProcessor() = default;

std::unique_ptr<SpmProcessor> SpmProcessor::Load(const std::string& model, std::string* error) {
  std::unique_ptr<SpmProcessor> p(new SpmProcessor());
  p->impl_ = std::make_unique<Impl>();
  const auto st = p->impl_->sp.LoadFromSerializedProto(model);
  if (!st.ok()) {
    *error = st.ToString();
    return nullptr;
  }
  return p;
}

bool SpmProcessor::Encode(const std::string& text, std::vector<int>* ids, std::string* error) const {
  const auto st = impl_->sp.Encode(text, ids);
  if (!st.ok()) *error = st.ToString();
  return st.ok();
}

bool SpmProcessor::Decode(const std::vector<int>& ids, std::string* text, std::string* error) const {
  const auto st = impl_->sp.Decode(ids, text);
  if (!st.ok()) *error = st.ToString();
  return st.ok();
}

int SpmProcessor::size() const { return impl_->sp.GetPieceSize(); }
std::string SpmProcessor::Piece(int id) const { return impl_->sp.IdToPiece(id); }
bool SpmProcessor::IsControl(int id) const { return impl_->sp.IsControl(id); }
int SpmProcessor::bos_id() const { return impl_->sp.bos_id(); }
#else
struct SpmProcessor::Impl {};
SpmProcessor::~SpmProcessor() = default;
std::unique_ptr<SpmProcessor> SpmProcessor::Load(const std::string&, std::string* error) {
  *error = "this ferry was built without libsentencepiece";
  return nullptr;
}
bool SpmProcessor::Encode(const std::string&, std::vector<int>*, std::string*) const { return false; }
bool SpmProcessor::Decode(const std::vector<int>&, std::string*, std::string*) const { return false; }
int SpmProcessor::size() const { return 0; }
std::string SpmProcessor::Piece(int) const { return ""; }
bool SpmProcessor::IsControl(int) const { return false; }
int SpmProcessor::bos_id() const { return -1; }
#endif

}  // namespace ferry::engine
