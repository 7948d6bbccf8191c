// Shows the RefAlign Identity Check text report on the node after it runs.
import { app } from "../../scripts/app.js";
import { ComfyWidgets } from "../../scripts/widgets.js";

app.registerExtension({
  name: "RefAlign.IdentityReport",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData.name !== "RefAlignIdentityCheck") return;
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      onExecuted?.apply(this, arguments);
      const text = (message?.text ?? []).join("\n");
      let widget = this.widgets?.find((w) => w.name === "identity_report");
      if (!widget) {
        widget = ComfyWidgets["STRING"](this, "identity_report", ["STRING", { multiline: true }], app).widget;
        widget.inputEl.readOnly = true;
        widget.serialize = false; // display only: never part of widgets_values
      }
      widget.value = text;
      this.setDirtyCanvas(true, true);
    };
  },
});
