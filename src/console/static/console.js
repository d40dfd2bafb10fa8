// regionguard review console: the one script. Pages work without it; it only reads a chosen
// policy file into the replay form's text area (nothing is uploaded until the form is posted).
document.addEventListener("DOMContentLoaded", () => {
  const file = document.getElementById("policy-file");
  const text = document.getElementById("policy_toml");
  if (file && text) {
    file.addEventListener("change", () => {
      const chosen = file.files && file.files[0];
      if (chosen) chosen.text().then((body) => { text.value = body; });
    });
  }
});
